"""gr2-train: each stage runs through the CLI on a tiny synthetic dataset, writes a
servable checkpoint, JSON-lines metrics and periodic checkpoints; resume continues exactly;
pre-training never sees actions; bad inputs give clear errors; DDP via torchrun."""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from gr2_policy.model import GR2Config, load_checkpoint
from gr2_policy.model.losses import RobotBatch, finetune_loss
from gr2_training.dataset import DatasetMeta, DatasetWriter, EpisodeDataset
from gr2_training.train import checkpointing as ckpt
from gr2_training.train.cli import main
from gr2_training.train.data import ClipData, StepBatches, select_episodes, step_loader
from gr2_training.train.distributed import shard
from gr2_training.train.errors import TrainingError
from gr2_training.train.loop import lr_at
from gr2_training.train.metrics_log import read_metrics
from gr2_training.train.settings import Settings
from gr2_training.train.tokens import EpisodeTokens
from gr2_training.train.vq_stage import token_patches
from safetensors.torch import load_file

# A small model (gr2-tiny's layout, narrower) and matching data: 32 px, 4x4 tokens per view,
# k = 4, h = 2, so that every stage's step takes milliseconds.
SIZE, K = 32, 4
SMALL = {
    "image_size": SIZE,
    "action_horizon": K,
    "history": 2,
    "codebook_size": 64,
    "codebook_dim": 16,
    "vq_channels": 8,
    "d_model": 32,
    "n_layers": 2,
    "n_heads": 2,
    "action_head_dim": 32,
    "action_head_heads": 2,
    "action_head_layers": 1,
    "latent_dim": 8,
    "text_dim": 32,
    "text_embed_dim": 32,
    "text_layers": 1,
    "text_heads": 2,
}
OVERRIDES = [arg for key, value in SMALL.items() for arg in ("--override", f"{key}={value}")]
FAST = ["--threads", "1", "--no-progress", "--log-every", "1"]
COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 70, 230)}


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_dataset(
    root: Path, episodes: int = 4, steps: int = 8, size: int = SIZE, k: int = K, shift: float = 0
) -> Path:
    """Coloured squares moving with the tool; actions are the next k states (+ ``shift``)."""
    meta = DatasetMeta(("head", "wrist"), size, 0.2, k, 0.1)
    writer = DatasetWriter(root, meta)
    rng = np.random.default_rng(0)
    for e in range(episodes):
        colour = list(COLOURS)[e % 3]
        total = steps + k
        pos = rng.uniform(0.2, 0.5, 3) + rng.uniform(-0.02, 0.02, 3) * np.arange(total)[:, None]
        quat = np.tile([1.0, 0.0, 0.0, 0.0], (total, 1))
        grip = (np.arange(total) > total // 2).astype(float)[:, None]
        trajectory = np.concatenate([pos, quat, grip], axis=1)
        actions = np.stack([trajectory[s + 1 : s + 1 + k] for s in range(steps)])
        actions[..., :3] += shift
        valid = np.ones((steps, k), bool)
        valid[-1, -1:] = False
        images = {}
        for view, offset in (("head", 0), ("wrist", size // 4)):
            frames = np.full((steps, size, size, 3), 30, np.uint8)
            for t in range(steps):
                x = int((pos[t, 0] - 0.2) * 60 + offset) % (size - 6)
                y = int((pos[t, 1] - 0.2) * 60) % (size - 6)
                frames[t, y : y + 6, x : x + 6] = COLOURS[colour]
            images[view] = frames
        writer.add(
            instruction=f"touch the {colour} block",
            task="touch",
            seed=e,
            success=e != 3,
            images=images,
            states=trajectory[:steps],
            actions=actions,
            action_valid=valid,
            times=0.2 * np.arange(steps),
            joint_positions=np.zeros((steps, 7)),
        )
    return root


def train(stage: str, data: Path, out: Path, *extra: str) -> int:
    return main([stage, "--data", str(data), "--out", str(out), *FAST, *extra])


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """tokenizer -> pretrain -> finetune, a few steps each, on one dataset."""
    root = tmp_path_factory.mktemp("train")
    data = write_dataset(root / "data")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tok, pre, fine = root / "tok", root / "pre", root / "fine"
    common = ["--batch-size", "4", "--save-every", "2"]
    tok_args = ["--steps", "4", *common, *OVERRIDES, "--restart-dead-codes-every", "2"]
    assert train("tokenizer", data, tok, *tok_args) == 0
    assert train("pretrain", data, pre, "--steps", "3", "--init", str(tok), *common) == 0
    fine_args = ["--steps", "3", "--init", str(pre), "--val-episodes", "1", *common]
    assert train("finetune", data, fine, *fine_args) == 0
    torch.set_num_threads(threads)
    return {"data": data, "tokenizer": tok, "pretrain": pre, "finetune": fine}


# -- pure functions ---------------------------------------------------------------------


def test_shards_of_a_global_batch_are_disjoint_and_complete() -> None:
    items = list(range(12))
    shards = [shard(items, r, 3) for r in range(3)]
    assert sorted(x for s in shards for x in s) == items and all(len(s) == 4 for s in shards)
    assert shard(items, 0, 1) == items
    with pytest.raises(ValueError, match="rank"):
        shard(items, 3, 3)


def test_batches_depend_only_on_seed_and_step_and_ranks_split_them() -> None:
    rng = np.random.default_rng(0)
    eps = [
        EpisodeTokens(
            None,
            rng.integers(0, 9, (t, 2, 4)),
            np.zeros((t, 8), np.float32),
            np.zeros((t, K, 8), np.float32),
            np.ones((t, K), bool),
        )
        for t in (5, 9, 2)
    ]
    clips = ClipData(eps, [0, 1, 0], clip_length=4)
    assert clips.skipped == 1 and clips.total_windows == 2 + 6
    whole = StepBatches(clips, seed=3, batch_size=6)
    halves = [StepBatches(clips, seed=3, batch_size=3, rank=r, world_size=2) for r in (0, 1)]
    for step in (0, 7):
        ids = whole.indices(step)
        assert np.array_equal(ids, whole.indices(step))  # a pure function of (seed, step)
        assert sorted(np.concatenate([h.indices(step) for h in halves])) == sorted(ids)
    assert not np.array_equal(whole.indices(0), whole.indices(1))
    batch = whole[0]
    assert batch["tokens"].shape == (6, 4, 2, 4) and batch["tokens"].dtype == torch.long
    assert batch["actions"].shape == (6, 4, K, 8) and batch["instruction"].shape == (6,)


def test_a_start_fraction_of_clips_begins_at_an_episode_start() -> None:
    eps = [
        EpisodeTokens(
            None,
            np.zeros((t, 2, 4), np.int64),
            np.zeros((t, 8), np.float32),
            np.zeros((t, K, 8), np.float32),
            np.ones((t, K), bool),
        )
        for t in (12, 30, 9)
    ]
    firsts = set(ClipData(eps, [0, 1, 2], clip_length=4).first_window[:-1].tolist())
    uniform = ClipData(eps, [0, 1, 2], clip_length=4).sample(np.random.default_rng(5), 400)
    assert np.array_equal(uniform, np.random.default_rng(5).integers(0, 9 + 27 + 6, 400))
    only_starts = ClipData(eps, [0, 1, 2], 4, start_fraction=1.0)
    assert set(only_starts.sample(np.random.default_rng(5), 400).tolist()) == firsts
    half = ClipData(eps, [0, 1, 2], 4, start_fraction=0.5).sample(np.random.default_rng(5), 400)
    at_start = np.isin(half, list(firsts)).mean()
    assert 0.4 < at_start < 0.7  # 0.5 drawn + the few uniform windows that are starts


def test_worker_processes_prepare_the_same_batches() -> None:
    rng = np.random.default_rng(1)
    eps = [
        EpisodeTokens(
            None,
            rng.integers(0, 9, (9, 2, 4)),
            rng.normal(size=(9, 8)).astype(np.float32),
            rng.normal(size=(9, K, 8)).astype(np.float32),
            rng.random((9, K)) > 0.5,
        )
        for _ in range(3)
    ]
    batches = StepBatches(ClipData(eps, [0, 1, 2], clip_length=3), seed=0, batch_size=2)
    inline = list(step_loader(batches, 5, 9, num_workers=0, pin_memory=False))
    workers = list(step_loader(batches, 5, 9, num_workers=2, pin_memory=False))
    assert len(inline) == len(workers) == 4
    for a, b in zip(inline, workers, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_episode_selection_by_task_success_and_held_out_episodes(tmp_path: Path) -> None:
    dataset = EpisodeDataset(write_dataset(tmp_path / "data", episodes=4, steps=3))
    assert select_episodes(dataset, tasks=None, success_only=False, val_episodes=0) == (
        [0, 1, 2, 3],
        [],
    )
    train_idx, val_idx = select_episodes(
        dataset, tasks=["touch"], success_only=True, val_episodes=1
    )
    assert val_idx == [0] and train_idx == [1, 2]  # episode 3 failed
    with pytest.raises(TrainingError, match="no successful episodes of task"):
        select_episodes(dataset, tasks=["push"], success_only=True, val_episodes=0)
    with pytest.raises(TrainingError, match="--val-episodes"):
        select_episodes(dataset, tasks=None, success_only=False, val_episodes=4)


def test_learning_rate_warms_up_then_decays_to_the_floor() -> None:
    s = Settings(stage="finetune", data="", out="", steps=100, lr=1e-3, warmup=10)
    lrs = [lr_at(i, s) for i in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in itertools.pairwise(lrs[9:]))
    assert lrs[-1] == pytest.approx(1e-4)  # min_lr_ratio 0.1


# -- the stages through the CLI ----------------------------------------------------------


@pytest.mark.parametrize("stage", ["tokenizer", "pretrain", "finetune"])
def test_each_stage_writes_a_servable_checkpoint_metrics_and_periodic_checkpoints(
    runs: dict[str, Path], stage: str
) -> None:
    run = runs[stage]
    model = load_checkpoint(run / "checkpoint")
    assert model.config == GR2Config.from_preset("gr2-tiny", **SMALL)
    record = json.loads((run / "run.json").read_text())
    assert record["stage"] == stage and GR2Config.from_dict(record["config"]) == model.config
    lines = [m for m in read_metrics(run / "metrics.jsonl") if "split" not in m]
    assert [m["step"] for m in lines] == list(range(1, len(lines) + 1))
    for m in lines:
        assert np.isfinite(m["total"]) and m["lr"] > 0 and m["examples_per_s"] > 0
        assert m["stage"] == stage and m["wall_s"] > 0
    last = ckpt.latest_periodic(run)
    assert last is not None and last.name == f"step-{len(lines):08d}"
    state = ckpt.load_trainer_state(last)
    assert state["step"] == len(lines) and state["stage"] == stage and state["optimizer"]["state"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["checkpoint"] == str(run / "checkpoint") and summary["steps_per_s"] > 0


def test_the_gr2_tiny_preset_runs_all_stages(tmp_path: Path) -> None:
    """The real preset (64 px, k = 10, h = 4: default clips of 2h = 8 steps), one step each."""
    data = write_dataset(tmp_path / "data", episodes=2, steps=8, size=64, k=10)
    one = ["--steps", "1", "--batch-size", "1"]
    assert train("tokenizer", data, tmp_path / "tok", *one) == 0
    assert train("pretrain", data, tmp_path / "pre", *one, "--init", str(tmp_path / "tok")) == 0
    assert train("finetune", data, tmp_path / "ft", *one, "--init", str(tmp_path / "pre")) == 0
    model = load_checkpoint(tmp_path / "ft" / "checkpoint")
    assert model.config == GR2Config.from_preset("gr2-tiny")
    (line,) = read_metrics(tmp_path / "ft" / "metrics.jsonl")
    assert np.isfinite(line["total"]) and line["arm"] > 0


def test_text_encoder_trains_with_the_gpt_when_asked(runs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "ft_text"
    args = ("--init", str(runs["pretrain"]), "--steps", "2", "--batch-size", "2")
    assert train("finetune", runs["data"], out, *args, "--text-encoder", "train") == 0
    before = load_file(runs["pretrain"] / "checkpoint" / "model.safetensors")
    after = load_file(out / "checkpoint" / "model.safetensors")
    names = [n for n in before if n.startswith("text_encoder.")]
    assert names and any(not torch.equal(before[n], after[n]) for n in names)
    assert json.loads((out / "run.json").read_text())["stage_data"]["text_encoder"] == "train"


def test_override_changes_the_init_models_architecture_keeping_what_fits(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "ft_lang"
    args = ("--init", str(runs["pretrain"]), "--steps", "2", "--batch-size", "2")
    overrides = ("--override", "lang_to_tokens=true", "--override", "text_encoder=words")
    assert train("finetune", runs["data"], out, *args, *overrides) == 0
    err = capsys.readouterr().err
    fresh = "gpt.act_lang.bias, gpt.act_lang.weight, gpt.image_lang.bias, gpt.image_lang.weight"
    assert f"4 tensors initialised afresh ({fresh})" in err
    model = load_checkpoint(out / "checkpoint")
    assert model.config.lang_to_tokens and model.config.text_encoder == "words"
    before = load_file(runs["pretrain"] / "checkpoint" / "model.safetensors")
    after = load_file(out / "checkpoint" / "model.safetensors")
    assert not any(n.startswith("text_encoder.") for n in after)  # the byte encoder's dropped
    vq = [n for n in before if n.startswith("vqgan.")]
    assert vq and all(torch.equal(before[n], after[n]) for n in vq)
    for name in ("gpt.image_lang.weight", "gpt.act_lang.weight"):  # zero at init, trained
        assert float(after[name].abs().max()) > 0
    run = json.loads((out / "run.json").read_text())
    assert run["settings"]["overrides"] == {"lang_to_tokens": True, "text_encoder": "words"}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("codebook_size=256", "tokenizer fields are fixed by --init"),
        ("dropout=0.1", "dropout"),
        ("text_encoder=gpt9", "text_encoder must be one of"),
    ],
)
def test_bad_overrides_are_refused(
    runs: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    override: str,
    message: str,
) -> None:
    args = ("--init", str(runs["pretrain"]), "--steps", "1", "--override", override)
    assert train("finetune", runs["data"], tmp_path / "o", *args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o" / "checkpoint").exists()


def test_tokenizer_reports_reconstruction_and_codebook_usage(runs: dict[str, Path]) -> None:
    lines = read_metrics(runs["tokenizer"] / "metrics.jsonl")
    assert {"reconstruction", "codebook", "commitment", "codebook_usage", "perplexity"} <= set(
        lines[0]
    )
    final = lines[-1]
    assert final["split"] == "eval" and 0 < final["eval_codebook_usage"] <= 1
    assert final["eval_psnr_db"] > 0 and final["eval_l1"] > 0
    assert (runs["tokenizer"] / "reconstructions.png").is_file()


def test_token_patches_follow_the_order_of_the_token_ids() -> None:
    config = GR2Config.from_preset("gr2-tiny")
    f, side = config.vq_downsample, config.tokens_per_side
    # every pixel holds the row-major index of the token grid cell it lies in
    cell = torch.arange(side * side, dtype=torch.float32).view(side, side)
    image = cell.repeat_interleave(f, 0).repeat_interleave(f, 1).expand(1, 3, -1, -1)
    patches = token_patches(image, f)
    assert patches.shape == (1, side * side, 3 * f * f)
    assert torch.equal(patches[0], cell.flatten()[:, None].expand(-1, 3 * f * f))


def test_local_patch_term_is_trained_logged_and_kept_on_resume(
    tmp_path: Path, runs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--steps", "2", "--batch-size", "4", "--save-every", "1", *OVERRIDES]
    assert train("tokenizer", runs["data"], tmp_path / "neg", *args, "--local-weight", "-1") == 2
    assert "--local-weight must be >= 0" in capsys.readouterr().err
    run = tmp_path / "local"
    assert train("tokenizer", runs["data"], run, *args, "--local-weight", "1.0") == 0
    lines = [m for m in read_metrics(run / "metrics.jsonl") if "split" not in m]
    assert all(m["local"] > 0 for m in lines)
    # with the term, the total is the plain objective plus its weighted mean squared error
    plain = read_metrics(runs["tokenizer"] / "metrics.jsonl")[0]
    assert "local" not in plain
    for m in lines:
        rest = m["reconstruction"] + m["codebook"] + 0.25 * m["commitment"]
        assert m["total"] == pytest.approx(rest + m["local"], rel=1e-5)
    # resuming step 1 of it without the term is refused: the head would be lost
    shutil.rmtree(run / "checkpoint")
    shutil.rmtree(run / "checkpoints" / "step-00000002")
    assert train("tokenizer", runs["data"], run, *args, "--resume") == 2
    assert "local_weight 1.0 -> 0.0" in capsys.readouterr().err
    assert not (run / "checkpoint").exists()


def test_a_run_recorded_before_a_fixed_setting_existed_resumes_with_its_default(
    tmp_path: Path, runs: dict[str, Path]
) -> None:
    record = json.loads((runs["tokenizer"] / "run.json").read_text())
    del record["settings"]["local_weight"]
    (tmp_path / "run.json").write_text(json.dumps(record))
    settings = dict(record["settings"], local_weight=0.0)
    assert ckpt.check_resumable(tmp_path, "tokenizer", settings)["stage"] == "tokenizer"
    with pytest.raises(TrainingError, match=r"local_weight 0\.0 -> 1\.0"):
        ckpt.check_resumable(tmp_path, "tokenizer", dict(settings, local_weight=1.0))


def test_only_the_trained_part_changes(runs: dict[str, Path]) -> None:
    def weights(stage: str) -> dict[str, torch.Tensor]:
        return load_file(runs[stage] / "checkpoint" / "model.safetensors")

    tok, pre, fine = weights("tokenizer"), weights("pretrain"), weights("finetune")

    def changed(a: dict, b: dict, prefix: str) -> bool:
        return any(not torch.equal(a[n], b[n]) for n in a if n.startswith(prefix))

    # Pre-training: the GPT's video path only; VQGAN, text encoder, action head untouched.
    assert changed(tok, pre, "gpt.blocks.")
    for frozen in ("vqgan.", "text_encoder.", "action_head.", "gpt.state_proj.", "gpt.act_query"):
        assert not changed(tok, pre, frozen), frozen
    # Fine-tuning: GPT and action head.
    assert changed(pre, fine, "action_head.") and changed(pre, fine, "gpt.")
    assert not changed(pre, fine, "vqgan.") and not changed(pre, fine, "text_encoder.")


def test_finetune_loss_includes_the_action_terms(runs: dict[str, Path]) -> None:
    lines = read_metrics(runs["finetune"] / "metrics.jsonl")
    for m in (m for m in lines if "split" not in m):
        assert m["arm"] > 0 and m["gripper"] > 0 and m["kl"] >= 0
        expected = 0.1 * m["image"] + m["arm"] + 0.01 * m["gripper"] + m["kl"]
        assert m["total"] == pytest.approx(expected, rel=1e-5)
    val = lines[-1]
    assert val["split"] == "val" and val["val_pos_err_mm"] > 0 and 0 <= val["val_token_acc"] <= 1
    pre = read_metrics(runs["pretrain"] / "metrics.jsonl")[0]
    assert pre["total"] == pre["image"] and "arm" not in pre


def test_pretraining_ignores_states_and_actions(tmp_path: Path, runs: dict[str, Path]) -> None:
    other = write_dataset(tmp_path / "shifted", shift=0.3)
    args = ["--steps", "2", "--batch-size", "4", "--init", str(runs["tokenizer"])]
    assert train("pretrain", runs["data"], tmp_path / "a", *args) == 0
    assert train("pretrain", other, tmp_path / "b", *args) == 0
    a, b = (read_metrics(tmp_path / r / "metrics.jsonl") for r in ("a", "b"))
    assert [m["total"] for m in a] == [m["total"] for m in b]
    # ...while fine-tuning on the same two datasets does see the difference.
    assert train("finetune", runs["data"], tmp_path / "c", *args) == 0
    assert train("finetune", other, tmp_path / "d", *args) == 0
    c, d = (read_metrics(tmp_path / r / "metrics.jsonl") for r in ("c", "d"))
    assert c[0]["arm"] != d[0]["arm"] and c[0]["image"] == d[0]["image"]


def test_hidden_states_are_not_seen_but_the_targets_stay_relative_to_them(
    runs: dict[str, Path],
) -> None:
    """Moving states and actions together leaves the relative action targets unchanged: a
    model that sees the states notices, one whose states are hidden does not."""
    policy = load_checkpoint(runs["finetune"] / "checkpoint")
    gen = torch.Generator().manual_seed(0)
    b, t, cfg = 3, 4, policy.config
    tokens = torch.randint(0, cfg.codebook_size, (b, t, 2, cfg.tokens_per_view), generator=gen)
    states = torch.cat((torch.rand(b, t, 3, generator=gen), torch.zeros(b, t, 5)), dim=-1)
    states[..., 3] = 1.0  # identity quaternion, gripper open
    actions = states[:, :, None].repeat(1, 1, K, 1)
    actions[..., :3] += 0.01 * torch.randn(b, t, K, 3, generator=gen)
    text = policy.embed_text(["touch the red block"] * b)
    valid = torch.ones(b, t, K, dtype=torch.bool)
    shift = torch.tensor([0.3, -0.2, 0.1, 0, 0, 0, 0, 0])

    def run(shown: bool, moved: bool) -> tuple[float, torch.Tensor]:
        offset = shift if moved else torch.zeros(8)
        batch = RobotBatch(
            text, tokens, states + offset, actions + offset, valid,
            torch.full((b, t), shown),
        )  # fmt: skip
        with torch.no_grad():
            loss = finetune_loss(policy, batch, generator=torch.Generator().manual_seed(1))
            lang = policy.gpt.project_language(text)
            act = policy(lang, tokens, batch.states, batch.state_valid, act_steps="all").act
        return float(loss["arm"]), act

    (loss_a, act_a), (loss_b, act_b) = run(False, False), run(False, True)
    assert torch.equal(act_a, act_b)  # what the model sees does not move...
    assert loss_b == pytest.approx(loss_a, rel=1e-5)  # ...nor do the targets (float rounding)
    assert not torch.equal(run(True, False)[1], run(True, True)[1])  # shown states are seen


def test_state_dropout_and_start_fraction_are_recorded_and_checked(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    args = ["--init", str(runs["pretrain"]), "--steps", "2", "--batch-size", "4"]
    knobs = ["--state-dropout", "0.5", "--start-fraction", "0.25"]
    assert train("finetune", runs["data"], tmp_path / "ok", *args, *knobs) == 0
    recorded = json.loads((tmp_path / "ok" / "run.json").read_text())["stage_data"]
    assert recorded["state_dropout"] == 0.5 and recorded["start_fraction"] == 0.25
    assert train("finetune", runs["data"], tmp_path / "bad", *args, "--state-dropout", "2") == 2
    assert train("finetune", runs["data"], tmp_path / "bad2", *args, "--start-fraction", "-1") == 2
    with pytest.raises(SystemExit):  # pre-training has no states to hide: no such flag
        train("pretrain", runs["data"], tmp_path / "pre", *args, "--state-dropout", "0.5")


@pytest.mark.parametrize("stage", ["tokenizer", "tokenizer-local", "finetune"])
def test_resume_continues_exactly(tmp_path: Path, runs: dict[str, Path], stage: str) -> None:
    extra = {
        "tokenizer": [*OVERRIDES, "--restart-dead-codes-every", "3"],
        # the local head is not part of the model: the trainer state carries it
        "tokenizer-local": [*OVERRIDES, "--local-weight", "1.0"],
        "finetune": ["--init", str(runs["pretrain"])],
    }[stage]
    stage = stage.removesuffix("-local")
    args = ["--steps", "4", "--save-every", "2", "--batch-size", "4", "--keep", "5", *extra]
    whole = tmp_path / "whole"
    assert train(stage, runs["data"], whole, *args) == 0
    # A crash after step 3: the checkpoint of step 2 is the last one, step 3 was logged.
    cut = tmp_path / "cut"
    shutil.copytree(whole, cut)
    shutil.rmtree(cut / "checkpoints" / "step-00000004")
    shutil.rmtree(cut / "checkpoint")
    lines = (cut / "metrics.jsonl").read_text().splitlines()
    (cut / "metrics.jsonl").write_text("\n".join(lines[:3]) + "\n")
    assert train(stage, runs["data"], cut, *args, "--resume") == 0

    summary = json.loads((cut / "summary.json").read_text())
    assert summary["resumed_from_step"] == 2
    a = load_file(whole / "checkpoint" / "model.safetensors")
    b = load_file(cut / "checkpoint" / "model.safetensors")
    assert all(torch.equal(a[n], b[n]) for n in a)
    strip = [
        {k: v for k, v in m.items() if "per_s" not in k and k != "wall_s"}
        for m in read_metrics(whole / "metrics.jsonl")
    ]
    again = [
        {k: v for k, v in m.items() if "per_s" not in k and k != "wall_s"}
        for m in read_metrics(cut / "metrics.jsonl")
    ]
    assert again == strip
    assert json.loads((cut / "run.json").read_text())["resumed"][0]["step"] == 2


def test_final_checkpoint_in_float16_is_half_the_size_and_loads(
    tmp_path: Path, runs: dict[str, Path]
) -> None:
    args = ["--steps", "1", "--batch-size", "2", "--init", str(runs["tokenizer"])]
    assert train("pretrain", runs["data"], tmp_path / "half", *args, "--save-dtype", "float16") == 0
    half = tmp_path / "half" / "checkpoint" / "model.safetensors"
    full = tmp_path / "half" / "checkpoints" / "step-00000001" / "model.safetensors"
    assert half.stat().st_size < 0.6 * full.stat().st_size
    model = load_checkpoint(half.parent)
    reference = load_checkpoint(full.parent)
    for (name, p), q in zip(
        model.state_dict().items(), reference.state_dict().values(), strict=True
    ):
        assert p.dtype == q.dtype, name
        torch.testing.assert_close(p, q, atol=1e-3, rtol=1e-3)


def test_bf16_autocast_trains(tmp_path: Path, runs: dict[str, Path]) -> None:
    args = ["--steps", "2", "--batch-size", "2", "--init", str(runs["pretrain"])]
    assert train("finetune", runs["data"], tmp_path / "bf16", *args, "--precision", "bf16") == 0
    lines = read_metrics(tmp_path / "bf16" / "metrics.jsonl")
    assert all(np.isfinite(m["total"]) for m in lines)
    model = load_checkpoint(tmp_path / "bf16" / "checkpoint")
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32


def test_token_cache_is_shared_between_runs(tmp_path: Path, runs: dict[str, Path]) -> None:
    cache = tmp_path / "cache"
    args = ["--steps", "1", "--batch-size", "2", "--init", str(runs["tokenizer"])]
    assert train("pretrain", runs["data"], tmp_path / "a", *args, "--token-cache", str(cache)) == 0
    (entries,) = list(cache.iterdir())
    stamps = {p.name: p.stat().st_mtime_ns for p in entries.iterdir()}
    assert len(stamps) == 4
    assert train("finetune", runs["data"], tmp_path / "b", *args, "--token-cache", str(cache)) == 0
    assert {p.name: p.stat().st_mtime_ns for p in entries.iterdir()} == stamps


def test_a_start_interrupted_while_tokenizing_starts_again_reusing_its_cache(
    tmp_path: Path, runs: dict[str, Path]
) -> None:
    args = ["--steps", "1", "--batch-size", "2", "--init", str(runs["tokenizer"])]
    assert train("pretrain", runs["data"], tmp_path / "a", *args) == 0
    # What an interruption during tokenization leaves: RUN_DIR/token_cache and nothing else.
    out = tmp_path / "b"
    out.mkdir()
    shutil.copytree(tmp_path / "a" / ckpt.TOKEN_CACHE_DIR, out / ckpt.TOKEN_CACHE_DIR)
    (entries,) = list((out / ckpt.TOKEN_CACHE_DIR).iterdir())
    stamps = {p.name: p.stat().st_mtime_ns for p in entries.iterdir()}
    assert train("pretrain", runs["data"], out, *args) == 0
    assert (out / "checkpoint" / "config.json").is_file()
    assert {p.name: p.stat().st_mtime_ns for p in entries.iterdir()} == stamps


# -- errors ------------------------------------------------------------------------------


def test_a_dataset_that_does_not_fit_the_model_is_refused_naming_both(
    tmp_path: Path, runs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    wide = write_dataset(tmp_path / "wide", episodes=1, size=16)
    assert train("finetune", wide, tmp_path / "o1", "--init", str(runs["pretrain"])) == 2
    err = capsys.readouterr().err
    assert "16x16" in err and "32x32" in err and str(wide) in err
    long_k = write_dataset(tmp_path / "k6", episodes=1, k=6)
    assert train("finetune", long_k, tmp_path / "o2", "--init", str(runs["pretrain"])) == 2
    assert "k=6" in capsys.readouterr().err
    # Pre-training needs no actions, so another horizon is fine there.
    init = ["--init", str(runs["pretrain"])]
    assert (
        train("pretrain", long_k, tmp_path / "o3", *init, "--steps", "1", "--batch-size", "1") == 0
    )
    assert train("pretrain", tmp_path / "nothing", tmp_path / "o4", *init) == 2
    assert "no dataset.json" in capsys.readouterr().err


def test_bad_init_and_out_paths_are_refused(
    tmp_path: Path, runs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    data = runs["data"]
    assert train("pretrain", data, tmp_path / "o", "--init", str(tmp_path / "missing")) == 2
    assert "does not exist" in capsys.readouterr().err
    assert train("pretrain", data, tmp_path / "o", "--init", str(data)) == 2
    assert "neither a checkpoint" in capsys.readouterr().err
    assert train("pretrain", data, runs["pretrain"], "--init", str(runs["tokenizer"])) == 2
    assert "already holds a pretrain run" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    assert train("pretrain", data, tmp_path / "notes", "--init", str(runs["tokenizer"])) == 2
    assert "holds todo.txt, not a gr2-train run" in capsys.readouterr().err
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine"
    (tmp_path / "file").write_text("x")
    assert train("pretrain", data, tmp_path / "file", "--init", str(runs["tokenizer"])) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_resume_refuses_a_run_of_another_stage_or_other_settings(
    runs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    data, pre = runs["data"], str(runs["pretrain"])
    assert train("finetune", data, runs["pretrain"], "--init", pre, "--resume") == 2
    assert "is a pretrain run, not a finetune run" in capsys.readouterr().err
    args = ["--init", str(runs["tokenizer"]), "--resume", "--batch-size", "4", "--save-every", "2"]
    assert train("pretrain", data, runs["pretrain"], *args, "--steps", "3", "--seed", "1") == 2
    assert "seed 0 -> 1" in capsys.readouterr().err


# -- torchrun ----------------------------------------------------------------------------


def test_torchrun_two_processes_match_one_process_with_the_global_batch(
    tmp_path: Path, runs: dict[str, Path]
) -> None:
    """Pre-training with 2 gloo ranks x batch 2 = one process x batch 4 (no randomness in
    that loss, so only float summation order differs)."""
    args = ["--steps", "2", "--init", str(runs["tokenizer"])]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cli = [*torchrun, "-m", "gr2_training.train.cli", "pretrain", "--data", str(runs["data"])]
    cmd = [*cli, *args, *FAST]
    done = subprocess.run(
        [*cmd, "--out", str(tmp_path / "ddp"), "--batch-size", "2"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert train("pretrain", runs["data"], tmp_path / "one", *args, "--batch-size", "4") == 0
    ddp, one = (read_metrics(tmp_path / r / "metrics.jsonl") for r in ("ddp", "one"))
    assert [m["step"] for m in ddp] == [1, 2]  # rank 0 alone writes
    assert ddp[0]["examples_per_s"] > 0
    for a, b in zip(ddp, one, strict=True):
        assert a["total"] == pytest.approx(b["total"], rel=1e-5)
    a = load_file(tmp_path / "ddp" / "checkpoint" / "model.safetensors")
    b = load_file(tmp_path / "one" / "checkpoint" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-4)
    assert json.loads((tmp_path / "ddp" / "run.json").read_text())["settings"]["world_size"] == 2

"""The three stages behind one interface: what is trained, on which batches, with which loss.

- ``tokenizer``: the VQGAN on single frames of every view (L1 + codebook + commitment), with
  dead codes restarted from the encoder's outputs;
- ``pretrain``: the GPT on video only - the same clips with states and actions dropped (the
  "no state" token), next-frame image tokens (``pretrain_loss``); VQGAN and text encoder
  frozen, the [ACT] query, the state projection and the action head untouched;
- ``finetune``: GPT + CVAE action head on robot clips (``finetune_loss``).

The loop (``loop.py``) only sees ``Stage``: a policy, a loss module whose forward(batch,
step) returns the loss terms (so DistributedDataParallel wraps it), and step batches.
"""

from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gr2_policy.model import GR2Config, GR2Policy
from gr2_policy.model.losses import (
    FINETUNE_WEIGHTS,
    PRETRAIN_WEIGHTS,
    LossWeights,
    RobotBatch,
    VideoBatch,
    action_targets,
    finetune_loss,
    pretrain_loss,
)
from torch import Tensor, nn

from gr2_training.dataset import EpisodeDataset
from gr2_training.train import data as data_mod
from gr2_training.train.checkpointing import (
    TOKEN_CACHE_DIR,
    load_policy,
    reconfigure,
    reconfigure_report,
    resolve_init,
)
from gr2_training.train.distributed import DistInfo, barrier, shard
from gr2_training.train.errors import TrainingError
from gr2_training.train.settings import Settings
from gr2_training.train.tokens import cache_episodes, load_cached

Progress = Callable[[str, int], Callable[[int], None]]  # (description, total) -> advance(n)
EVAL_CLIPS = 64  # validation clips (GPT stages)


def step_seed(seed: int, step: int, rank: int, salt: int) -> int:
    """A 63-bit seed for the randomness of one step on one rank (e.g. the CVAE noise)."""
    state = np.random.SeedSequence([seed, step, salt, rank]).generate_state(2, np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1


class Stage(ABC):
    """One training stage; ``prepare`` must run before ``module``/``batches`` exist."""

    name: str
    examples: str  # what a batch holds: "frames" or "clips"
    uses_actions: bool = False
    find_unused_parameters: bool = False

    def __init__(self, settings: Settings, info: DistInfo) -> None:
        self.settings = settings
        self.info = info
        self.module: nn.Module
        self.batches: data_mod.StepBatches
        self.policy: GR2Policy
        self.record: dict[str, Any] = {}

    def new_policy(self) -> GR2Policy:
        """The starting weights of a fresh run (from --init)."""
        if not self.settings.init:
            raise TrainingError(f"{self.name} needs --init (a checkpoint or a run directory)")
        policy = load_policy(resolve_init(self.settings.init), self.info.device)
        if not self.settings.overrides:
            return policy
        new = reconfigure(policy, self.settings.overrides, self.settings.seed)
        if self.info.is_main:
            report = reconfigure_report(policy, new)
            print(
                f"gr2-train {self.name}: --override {self.settings.overrides}: "
                f"{len(report['initialised'])} tensors initialised afresh "
                f"({', '.join(report['initialised']) or 'none'}), "
                f"{len(report['dropped'])} dropped",
                file=sys.stderr,
            )
        return new

    @abstractmethod
    def prepare(
        self, policy: GR2Policy, dataset: EpisodeDataset, run_dir: Path, progress: Progress
    ) -> None:
        """Build the loss module and the batches."""

    def to_device(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        device = self.info.device
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}

    def named_trainable(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]

    def after_step(
        self,
        out: dict[str, Tensor],
        batch: dict[str, Tensor],
        step: int,
        optimizer: torch.optim.Optimizer,
    ) -> None:
        """Bookkeeping after the optimizer step (statistics, codebook restarts)."""
        return None

    def extra_state(self) -> dict[str, Any]:
        """Stage state a periodic checkpoint must carry for an exact resume."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore ``extra_state`` (after ``prepare``)."""
        return None

    def window_metrics(self) -> dict[str, float]:
        """Extra metrics over the steps since the last call (e.g. codebook usage)."""
        return {}

    @abstractmethod
    def evaluate(self, final: bool) -> dict[str, float]:
        """Figures on held-out (or fixed) examples; {} when there is nothing to evaluate."""


class GPTLoss(nn.Module):
    """forward(batch, step) -> the stage loss terms; holds the instruction embeddings."""

    def __init__(
        self,
        policy: GR2Policy,
        embeddings: Tensor,
        instructions: list[str],
        train_text: bool,
        stage: str,
        weights: LossWeights,
        seed: int,
        rank: int,
        state_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.policy = policy
        self.register_buffer("embeddings", embeddings, persistent=False)
        self.instructions = instructions
        self.train_text = train_text
        self.stage = stage
        self.weights = weights
        self.seed = seed
        self.rank = rank
        self.state_dropout = state_dropout

    def text(self, rows: Tensor) -> Tensor:
        """Text embeddings of the instructions in table ``rows``: through the encoder (with
        gradients) when it trains, else the embeddings computed once at the start."""
        if not self.train_text:
            return self.embeddings[rows]
        return self.policy.text_encoder.encode([self.instructions[i] for i in rows.tolist()])

    def hidden_states(self, states: Tensor, step: int) -> Tensor | None:
        """state_valid (B, T): a ``state_dropout`` fraction of the clips show no state at
        all (drawn per step and rank, reproducibly); None without dropout."""
        if self.state_dropout <= 0.0:
            return None
        b, t = states.shape[:2]
        generator = torch.Generator().manual_seed(step_seed(self.seed, step, self.rank, 3))
        shown = torch.rand(b, generator=generator) >= self.state_dropout
        return shown[:, None].expand(b, t).to(states.device)

    def forward(self, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        text = self.text(batch["instruction"])
        if self.stage == "pretrain":  # states and actions dropped, as for web video
            return pretrain_loss(self.policy, VideoBatch(text, batch["tokens"]), self.weights)
        robot = RobotBatch(
            text,
            batch["tokens"],
            batch["states"],
            batch["actions"],
            batch["action_valid"],
            self.hidden_states(batch["states"], step),
        )
        generator = torch.Generator().manual_seed(step_seed(self.seed, step, self.rank, 2))
        return finetune_loss(self.policy, robot, self.weights, generator=generator)


class GPTStage(Stage):
    """pretrain (video only) or finetune (video + actions)."""

    examples = "clips"

    def __init__(self, name: str, settings: Settings, info: DistInfo) -> None:
        super().__init__(settings, info)
        self.name = name
        self.uses_actions = name == "finetune"
        base = PRETRAIN_WEIGHTS if name == "pretrain" else FINETUNE_WEIGHTS
        s = settings
        self.weights = LossWeights(
            image=base.image if s.image_weight is None else s.image_weight,
            arm=base.arm if s.arm_weight is None else s.arm_weight,
            gripper=base.gripper if s.gripper_weight is None else s.gripper_weight,
            kl=base.kl if s.kl_weight is None else s.kl_weight,
        )

    def clip_length(self, config: GR2Config) -> int:
        t = self.settings.clip_length or 2 * config.history
        if t < 2:
            raise TrainingError(f"--clip-length must be >= 2 (next-frame targets), got {t}")
        return t

    def prepare(
        self, policy: GR2Policy, dataset: EpisodeDataset, run_dir: Path, progress: Progress
    ) -> None:
        s, info = self.settings, self.info
        cfg = policy.config
        t = self.clip_length(cfg)
        train_idx, val_idx = data_mod.select_episodes(
            dataset, tasks=s.tasks, success_only=s.success_only, val_episodes=s.val_episodes
        )
        cache_root = Path(s.token_cache) if s.token_cache else run_dir / TOKEN_CACHE_DIR
        everything = train_idx + val_idx
        mine = shard(everything, info.rank, info.world_size)
        advance = progress(f"{self.name}: tokenizing episodes", len(mine))
        policy.eval()
        directory = cache_episodes(
            dataset, everything, policy, cache_root, info.device, tokenize=mine, progress=advance
        )
        barrier(info)  # every rank's share is on disk
        episodes = load_cached(dataset, everything, directory)
        instructions = sorted({ep.info.instruction for ep in episodes})
        row = {text: i for i, text in enumerate(instructions)}
        ids = [row[ep.info.instruction] for ep in episodes]
        with torch.no_grad():
            embeddings = torch.cat(
                [
                    policy.embed_text(instructions[i : i + 64])
                    for i in range(0, len(instructions), 64)
                ]
            )
        n_train = len(train_idx)
        self.train_data = data_mod.ClipData(
            episodes[:n_train], ids[:n_train], t, start_fraction=s.start_fraction
        )
        self.val_data = data_mod.ClipData(episodes[n_train:], ids[n_train:], t) if val_idx else None
        if self.name == "pretrain":
            # Video only: what reads states or answers [ACT] queries stays as it was.
            frozen = [policy.action_head, policy.gpt.state_proj]
            for module in frozen:
                module.requires_grad_(False)
            policy.gpt.act_query.requires_grad_(False)
        policy.train()
        self.policy = policy
        train_text = s.text_encoder == "train"
        if train_text:  # it trains with the GPT (in eval mode: it has no dropout)
            policy.text_encoder.requires_grad_(True)
        self.module = GPTLoss(
            policy, embeddings, instructions, train_text, self.name, self.weights, s.seed,
            info.rank, state_dropout=s.state_dropout,
        )  # fmt: skip
        self.batches = data_mod.StepBatches(
            self.train_data, s.seed, s.batch_size, info.rank, info.world_size
        )
        self.record = {
            "clip_length": t,
            "episodes": {"train": n_train, "val": len(val_idx)},
            "skipped_short_episodes": self.train_data.skipped,
            "windows": self.train_data.total_windows,
            "instructions": len(instructions),
            "token_cache": str(directory),
            "loss_weights": asdict(self.weights),
            "text_encoder": "train" if train_text else "frozen",
            "state_dropout": s.state_dropout,
            "start_fraction": s.start_fraction,
        }

    @torch.no_grad()
    def evaluate(self, final: bool) -> dict[str, float]:
        if self.val_data is None:
            return {}
        policy, module = self.policy, self.module
        was_training = policy.training
        policy.eval()
        ids = data_mod.fixed_sample(self.val_data, self.settings.seed, EVAL_CLIPS)
        totals: dict[str, float] = {}
        count = 0
        for chunk in np.array_split(ids, max(1, len(ids) // self.settings.batch_size)):
            batch = self.to_device(self.val_data.gather(chunk))
            out = module(batch, 0)
            out.update(self._accuracy(batch))
            for key, value in out.items():
                totals[key] = totals.get(key, 0.0) + float(value) * len(chunk)
            count += len(chunk)
        policy.train(was_training)
        return {f"val_{k}": v / count for k, v in totals.items()}

    def _accuracy(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Next-frame token accuracy (greedy); for finetune also the error of the decoded
        waypoints with z = 0 (position [mm], gripper open/closed agreement)."""
        policy = self.policy
        cfg = policy.config
        lang = policy.gpt.project_language(self.module.text(batch["instruction"]))
        tokens, states = batch["tokens"], batch["states"]
        b, t = tokens.shape[:2]
        finetune = self.name == "finetune"
        valid = torch.full((b, t), finetune, dtype=torch.bool, device=tokens.device)
        out = policy(lang, tokens, states, valid, act_steps="all" if finetune else "none")
        vn = cfg.image_tokens_per_step
        predicted = policy.gpt.image_logits(out.hidden[:, 1:, :vn]).argmax(-1)
        result = {"token_acc": (predicted == tokens[:, 1:].reshape(b, t - 1, vn)).float().mean()}
        if finetune:
            flat_states = states.reshape(b * t, -1)
            raw = policy.action_head.decode(out.act.reshape(b * t, -1))
            decoded = policy.decode_actions(raw, flat_states)
            truth = batch["actions"].reshape(b * t, cfg.action_horizon, -1)
            mask = batch["action_valid"].reshape(b * t, -1).float()
            n = mask.sum().clamp_min(1)
            err = (decoded.positions - truth[..., :3]).norm(dim=-1)
            result["pos_err_mm"] = 1000 * (err * mask).sum() / n
            target = action_targets(states, batch["actions"], cfg.action_position_scale_m)
            agree = (decoded.grippers > 0.5).float() == target.reshape(b * t, -1, 10)[..., 9]
            result["gripper_acc"] = (agree.float() * mask).sum() / n
        return result


def build_stage(settings: Settings, info: DistInfo) -> Stage:
    """The stage named by ``settings.stage``."""
    if settings.stage == "tokenizer":
        from gr2_training.train.vq_stage import TokenizerStage  # imports this module

        return TokenizerStage(settings, info)
    if settings.stage in ("pretrain", "finetune"):
        return GPTStage(settings.stage, settings, info)
    raise TrainingError(f"unknown stage {settings.stage!r}")

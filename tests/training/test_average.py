"""gr2-average: the written checkpoint's weights are the inputs' element-wise mean, it loads
strictly, and inputs that cannot be averaged are refused with a message and nothing written."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from gr2_policy.model import GR2Config, GR2Policy, init_random_policy, load_checkpoint, model_hash
from gr2_policy.model.checkpoint import save_checkpoint
from gr2_training.average import main
from safetensors import safe_open

from tests.support.processes import child_env, script_path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three gr2-tiny checkpoints with different random weights; the last inside a run
    directory (RUN/checkpoint), as gr2-train leaves it."""
    root = tmp_path_factory.mktemp("average")
    paths = []
    for seed in range(3):
        target = root / f"ckpt{seed}" if seed < 2 else root / "run" / "checkpoint"
        save_checkpoint(init_random_policy("gr2-tiny", seed), target)
        paths.append(target)
    return paths


def test_the_average_is_the_element_wise_mean(inputs: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "avg"
    args = [str(inputs[0]), str(inputs[1]), str(inputs[2].parent)]  # a run directory too
    assert main([*args, "--out", str(out)]) == 0

    averaged = load_checkpoint(out / "checkpoint")
    states = [load_checkpoint(p).state_dict() for p in inputs]
    for name, tensor in averaged.state_dict().items():
        expected = (states[0][name] + states[1][name] + states[2][name]) / 3
        torch.testing.assert_close(tensor, expected, rtol=0, atol=1e-6, msg=name)
    # it is none of its inputs (their random weights differ in every tensor)
    for state in states:
        assert any(not torch.equal(t, state[n]) for n, t in averaged.state_dict().items())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["inputs"] == [str(p) for p in inputs]
    assert summary["model_version"] == model_hash(averaged)


def test_float16_output_is_half_size_and_close(inputs: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "avg16"
    assert main([str(inputs[0]), str(inputs[1]), "--out", str(out), "--save-dtype", "float16"]) == 0
    weights = out / "checkpoint" / "model.safetensors"
    with safe_open(str(weights), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}  # noqa: SIM118
    a, b = (load_checkpoint(p).state_dict() for p in inputs[:2])
    for name, tensor in load_checkpoint(out / "checkpoint").state_dict().items():
        torch.testing.assert_close(tensor, (a[name] + b[name]) / 2, rtol=1e-3, atol=1e-3)


def test_inputs_that_cannot_be_averaged_are_refused(
    inputs: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "other_config"
    save_checkpoint(GR2Policy(GR2Config.from_preset("gr2-tiny", lang_to_tokens=True)), other)
    cases = {
        "at least two": [str(inputs[0])],
        "lang_to_tokens": [str(inputs[0]), str(other)],
        "does not exist": [str(inputs[0]), str(tmp_path / "missing")],
    }
    for message, args in cases.items():
        out = tmp_path / f"out_{len(args)}_{message.replace(' ', '_')}"
        assert main([*args, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert "gr2-average: error:" in err and message in err, err
        assert not out.exists()


def test_the_console_script_is_installed(inputs: list[Path], tmp_path: Path) -> None:
    result = subprocess.run(
        [script_path("gr2-average"), str(inputs[0]), "--out", str(tmp_path / "x")],
        capture_output=True, text=True, env=child_env(), timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert "at least two" in result.stderr


def test_tensors_the_inputs_share_are_kept_bit_for_bit(tmp_path: Path) -> None:
    """A frozen part (the tokenizer) is the same in every fine-tuning run: its average must be
    the very same bytes, signed zeros included, so token caches keyed on it stay valid."""
    base = init_random_policy("gr2-tiny", 0)
    with torch.no_grad():
        base.vqgan.encoder.conv_in.weight[0] = -0.0
    other = init_random_policy("gr2-tiny", 1)
    other.vqgan.load_state_dict(base.vqgan.state_dict())
    save_checkpoint(base, tmp_path / "a")
    save_checkpoint(other, tmp_path / "b")
    assert main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "avg")]) == 0
    averaged = load_checkpoint(tmp_path / "avg" / "checkpoint")
    for name, tensor in base.vqgan.state_dict().items():
        kept = averaged.vqgan.state_dict()[name]
        assert torch.equal(
            kept.reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)
        ), name

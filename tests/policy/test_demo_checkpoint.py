"""The committed demo checkpoint (gr2_policy/checkpoints/demo): it is there, it is small, it loads
strictly, its config is the recipe's (gr2-tiny + the words text encoder + the instruction on every
token), and it is what the server serves when given no checkpoint."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from gr2_policy.checkpoints import DEMO_CHECKPOINT, bundled_demo_checkpoint
from gr2_policy.model import GR2Config, init_random_policy, load_checkpoint, model_hash
from safetensors import safe_open

from tests.support.processes import child_env, script_path
from tests.support.servers import run_policy_server

MAX_BYTES = 20 * 1024 * 1024


def test_the_demo_checkpoint_is_bundled_and_small() -> None:
    assert bundled_demo_checkpoint() == DEMO_CHECKPOINT
    files = sorted(p.name for p in DEMO_CHECKPOINT.iterdir() if p.is_file())
    assert files == ["config.json", "model.safetensors"]
    total = sum(p.stat().st_size for p in DEMO_CHECKPOINT.iterdir() if p.is_file())
    assert total < MAX_BYTES, f"demo checkpoint is {total / 2**20:.1f} MiB (limit 20 MiB)"


def test_its_config_is_the_recipes() -> None:
    data = json.loads((DEMO_CHECKPOINT / "config.json").read_text())
    expected = GR2Config.from_preset("gr2-tiny", text_encoder="words", lang_to_tokens=True)
    assert GR2Config.from_dict(data) == expected
    with safe_open(str(DEMO_CHECKPOINT / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"preset": "gr2-tiny"}
        # saved in float16 (--save-dtype float16) to stay small
        assert {f.get_slice(name).get_dtype() for name in f.keys()} == {"F16"}  # noqa: SIM118


@pytest.fixture(scope="module")
def demo_model():
    return load_checkpoint(DEMO_CHECKPOINT)


def test_it_loads_strictly_and_its_tokenizer_is_trained(demo_model) -> None:
    """A held-out sim scene survives tokenize -> decode closely; random weights cannot."""
    from gr2_wbc.robots.sim.backend import MujocoGen3

    assert demo_model.config.preset == "gr2-tiny"
    assert not demo_model.training
    size = demo_model.config.image_size
    sim = MujocoGen3(seed=1_000_000)
    try:
        cams = sim.render_cameras(size, size)
    finally:
        sim.close()
    images = torch.from_numpy(np.stack([cams[v] for v in demo_model.config.views]))[None]
    errors = {}
    for name, model in (("demo", demo_model), ("random", init_random_policy("gr2-tiny", 0))):
        with torch.inference_mode():
            decoded = model.decode_frames(model.tokenize_images(images))
        errors[name] = float((decoded.float() - images.float()).abs().mean())
    assert errors["demo"] < 20.0, errors  # levels of 255; ~8-14 when trained
    assert errors["random"] > 3 * errors["demo"], errors


def test_the_server_serves_it_by_default(demo_model, tmp_path: Path) -> None:
    """`gr2-policy-server serve` with no checkpoint serves exactly these weights."""
    with run_policy_server(tmp_path) as server:
        info = subprocess.run(
            [script_path("gr2"), "--server", server.grpc_target, "info", "--json"],
            capture_output=True, text=True, check=True, env=child_env(), timeout=60,
        )  # fmt: skip
        log = server.log_text()
    assert json.loads(info.stdout)["model_version"] == model_hash(demo_model)
    assert "bundled_checkpoint" in log and "RANDOMLY INITIALISED" not in log

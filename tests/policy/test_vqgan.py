"""VQGAN image tokenizer: shapes, presets' sizes, determinism, input checks, the
straight-through estimator and that it can learn (overfits a fixed batch)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from gr2_policy.model.config import GR2Config
from gr2_policy.model.vqgan import COMMITMENT_BETA, VQGAN, VQOutput


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Run single-threaded: on a shared 2-core machine, OpenMP's multi-threaded kernels can
    slow down a hundredfold while another process holds a core; one thread only halves."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build(preset: str, seed: int = 0, **overrides: object) -> VQGAN:
    torch.manual_seed(seed)
    return VQGAN(GR2Config.from_preset(preset, **overrides))


@pytest.fixture(scope="module")
def tiny() -> VQGAN:
    return build("gr2-tiny").eval()


def random_images(b: int, size: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, size, size, 3), generator=gen).to(torch.uint8)


def smooth_images(b: int, size: int, seed: int) -> torch.Tensor:
    """Float (b, 3, size, size) in [-1, 1]: a coloured gradient plus a coloured blob each."""
    gen = torch.Generator().manual_seed(seed)
    axis = torch.linspace(-1.0, 1.0, size)
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    out = []
    for _ in range(b):
        slope = torch.rand(2, 3, 1, 1, generator=gen) - 0.5
        centre = torch.rand(2, generator=gen) * 1.2 - 0.6
        colour = torch.rand(3, 1, 1, generator=gen) * 2.0 - 1.0
        blob = torch.exp(-((xx - centre[0]) ** 2 + (yy - centre[1]) ** 2) / 0.15)
        out.append((slope[0] * xx + slope[1] * yy + colour * blob).clamp(-1.0, 1.0))
    return torch.stack(out)


@pytest.mark.parametrize("preset", ["gr2-tiny", "gr2-small"])
def test_shapes_and_dtypes(preset: str) -> None:
    cfg = GR2Config.from_preset(preset)
    vq = build(preset).eval()
    s, n, d = cfg.image_size, cfg.tokens_per_view, cfg.codebook_dim
    assert (vq.image_size, vq.side) == (s, cfg.tokens_per_side)
    assert tuple(vq.codebook.weight.shape) == (cfg.codebook_size, d)
    with torch.inference_mode():
        ids = vq.encode(random_images(2, s, seed=1))
        assert ids.shape == (2, n) and ids.dtype == torch.long
        assert int(ids.min()) >= 0 and int(ids.max()) < cfg.codebook_size
        pixels = vq.decode(ids)
        assert pixels.shape == (2, s, s, 3) and pixels.dtype == torch.uint8
        vectors = vq.code_vectors(ids)
        assert vectors.shape == (2, n, d) and vectors.dtype == torch.float32
        torch.testing.assert_close(vectors.norm(dim=-1), torch.ones(2, n))
        assert vq.code_vectors(ids[0, :5]).shape == (5, d)
        # A code vector's nearest code is itself: lookup and code_vectors agree.
        assert torch.equal(vq.quantize(vectors), ids)
    out = vq(smooth_images(2, s, seed=2))
    assert isinstance(out, VQOutput)
    assert out.reconstruction.shape == (2, 3, s, s)
    assert float(out.reconstruction.detach().abs().max()) <= 1.0
    assert out.ids.shape == (2, n) and out.ids.dtype == torch.long
    for loss in (out.codebook_loss, out.commitment_loss):
        assert loss.shape == () and torch.isfinite(loss)


def test_forward_ids_match_encode(tiny: VQGAN) -> None:
    images = random_images(3, 64, seed=3)
    with torch.inference_mode():
        ids = tiny.encode(images)
        out = tiny(images.permute(0, 3, 1, 2).float() / 127.5 - 1.0)
    assert torch.equal(out.ids, ids)


def test_parameter_counts_on_meta_device() -> None:
    counts = {}
    for preset in ("gr2-tiny", "gr2-small", "gr2-base"):
        with torch.device("meta"):
            vq = VQGAN(GR2Config.from_preset(preset))
        assert all(p.is_meta for p in vq.parameters())
        counts[preset] = sum(p.numel() for p in vq.parameters())
    assert 63e6 <= counts["gr2-base"] <= 77e6, counts
    assert counts["gr2-tiny"] < counts["gr2-small"] < counts["gr2-base"]


def test_base_encode_decode_256px() -> None:
    vq = build("gr2-base").eval()
    with torch.inference_mode():
        ids = vq.encode(random_images(1, 256, seed=4))
        assert ids.shape == (1, 256) and int(ids.max()) < 8192
        pixels = vq.decode(ids)
    assert pixels.shape == (1, 256, 256, 3) and pixels.dtype == torch.uint8


def test_encode_is_deterministic_batch_independent_and_uses_codes(tiny: VQGAN) -> None:
    images = random_images(4, 64, seed=7)
    with torch.inference_mode():
        ids = tiny.encode(images)
        assert torch.equal(ids, tiny.encode(images))
        assert torch.equal(ids, build("gr2-tiny").eval().encode(images))  # seeded init
        for i in range(4):
            assert torch.equal(ids[i : i + 1], tiny.encode(images[i : i + 1]))
    assert ids.unique().numel() > 50  # codes are used, not collapsed to a few


def test_frozen_module_encodes_without_grad() -> None:
    vq = build("gr2-tiny").requires_grad_(False).eval()
    ids = vq.encode(random_images(2, 64, seed=8))
    assert not ids.requires_grad
    assert not vq.code_vectors(ids).requires_grad


@pytest.mark.parametrize(
    "images",
    [
        torch.zeros(2, 64, 64, 3),  # float, not uint8
        torch.zeros(2, 32, 32, 3, dtype=torch.uint8),  # wrong size
        torch.zeros(2, 3, 64, 64, dtype=torch.uint8),  # channels first
        torch.zeros(64, 64, 3, dtype=torch.uint8),  # no batch dimension
    ],
)
def test_encode_rejects_bad_images(tiny: VQGAN, images: torch.Tensor) -> None:
    with pytest.raises(ValueError, match=r"expected uint8 images \(B, 64, 64, 3\)"):
        tiny.encode(images)


def test_forward_rejects_bad_images(tiny: VQGAN) -> None:
    with pytest.raises(ValueError, match=r"expected float images \(B, 3, 64, 64\)"):
        tiny(torch.zeros(2, 64, 64, 3))


def test_straight_through_gradients() -> None:
    vq = build("gr2-tiny")
    x = smooth_images(2, 64, seed=5)
    losses = vq.training_losses(x)
    assert set(losses) == {"reconstruction", "codebook", "commitment", "total"}
    expected = (
        losses["reconstruction"] + losses["codebook"] + COMMITMENT_BETA * losses["commitment"]
    )
    torch.testing.assert_close(losses["total"], expected)

    # The reconstruction alone reaches the encoder only through the straight-through copy.
    losses["reconstruction"].backward(retain_graph=True)
    for p in (vq.encoder.conv_in.weight, vq.quant_conv.weight, vq.decoder.conv_out.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert vq.codebook.weight.grad is None or not vq.codebook.weight.grad.any()

    vq.zero_grad()
    losses["total"].backward()
    assert all(p.grad is not None for p in vq.parameters())
    assert vq.encoder.conv_in.weight.grad.abs().sum() > 0
    codebook_grad = vq.codebook.weight.grad
    assert codebook_grad is not None
    used = torch.zeros(len(codebook_grad), dtype=torch.bool)
    used[vq(x).ids.unique()] = True
    assert codebook_grad[used].abs().sum(dim=1).gt(0).all()  # every used code moves
    assert not codebook_grad[~used].any()  # unused codes get nothing


def test_tiny_vqgan_overfits_a_fixed_batch() -> None:
    # The gr2-tiny architecture at 32 px (a 4x4 token grid) keeps this to a few seconds.
    vq = build("gr2-tiny", seed=0, image_size=32)
    x = smooth_images(4, 32, seed=6)
    opt = torch.optim.Adam(vq.parameters(), lr=1e-3)
    first = None
    for _ in range(150):
        losses = vq.training_losses(x)
        first = losses["reconstruction"].item() if first is None else first
        opt.zero_grad()
        losses["total"].backward()
        opt.step()
    with torch.no_grad():
        last = vq.training_losses(x)["reconstruction"].item()
    assert last < first / 3, (first, last)

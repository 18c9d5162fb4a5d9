"""Can the GPT read a block's colour from its image tokens? A linear probe on the tokenizer.

The demo model takes "green" for blue far more often than anything else (README, "The demo
model"). Decoded frames show every block in its colour, so the colour is in the tokens
somewhere; the question is whether it is in the tokens *at the block*, as a feature a
linear layer can read (the GPT's input is a linear map of each token's code vector), or only
spread over the block's neighbours, where only the decoder's context recovers it.

For a random frame of each view of each episode, every block with at least ``MIN_PIXELS``
pixels (found by colour, ``gr2_training.curriculum.block_masks``) gives three features:

- ``code_vectors``: the mean of the code vectors of the 8x8-pixel patches the block covers,
  weighted by how many of its pixels each holds (what ``image_in`` sees);
- ``code_ids``: the same mean over one-hot code ids (what a learned per-code embedding
  would see);
- ``decoded``: the mean colour of the block's pixels in the VQGAN's reconstruction.

It also reports ``dominant_code``: how often the code of the patch that holds most of a
block's pixels has that block's colour as its most frequent one, over all blocks (fitted and
scored on the same blocks, so an upper bound for any per-code lookup): whether a code names
a colour at all.

A multinomial logistic regression per feature is fitted on 2/3 of the blocks and scored on
the rest. It prints JSON: for each feature the held-out accuracy, the accuracy per true
colour and the confusion matrix (rows: true colour, columns: predicted).

    python -m gr2_training.colour_probe --checkpoint runs/demo/tok/checkpoint \\
        --data data/sim --episodes 1350
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

import numpy as np
import torch
from gr2_policy.model.checkpoint import load_checkpoint
from gr2_policy.model.policy import GR2Policy
from torch.nn.functional import cross_entropy, one_hot

from gr2_training.curriculum import COLOURS, block_masks
from gr2_training.dataset import EpisodeDataset

MIN_PIXELS = 4
FEATURES = ("code_vectors", "code_ids", "decoded")


@dataclass
class BlockFeatures:
    """Per visible block: its colour index into COLOURS and the three features."""

    labels: list[int]
    features: dict[str, list[np.ndarray]]


@torch.no_grad()
def collect(
    policy: GR2Policy, dataset: EpisodeDataset, episodes: list[int], seed: int
) -> BlockFeatures:
    """Blocks of one random frame per episode, in every view the policy sees."""
    cfg = policy.config
    side = cfg.image_size // cfg.vq_downsample  # patches per image side
    vectors = policy.vqgan.code_vectors(torch.arange(cfg.codebook_size))
    out = BlockFeatures([], {f: [] for f in FEATURES})
    rng = np.random.default_rng(seed)
    for index in episodes:
        episode = dataset.load(index)
        t = int(rng.integers(episode.steps))
        frames = np.stack([episode.images[v][t] for v in cfg.views])  # (V, H, W, 3)
        ids = policy.tokenize_images(torch.from_numpy(frames)[None, None])[0, 0]  # (V, N)
        decoded = policy.decode_frames(ids[None, None])[0, 0].numpy()  # (V, H, W, 3)
        for v in range(len(cfg.views)):
            for colour, mask in block_masks(frames[v]).items():
                if mask.sum() < MIN_PIXELS:
                    continue
                ys, xs = np.nonzero(mask)
                weights = np.bincount(
                    (ys // cfg.vq_downsample) * side + xs // cfg.vq_downsample, minlength=side**2
                )
                w = torch.from_numpy(weights / weights.sum()).float()[:, None]
                out.labels.append(COLOURS.index(colour))
                out.features["code_vectors"].append((w * vectors[ids[v]]).sum(0).numpy())
                hot = one_hot(ids[v], cfg.codebook_size).float()
                out.features["code_ids"].append((w * hot).sum(0).numpy())
                out.features["decoded"].append(decoded[v][mask].mean(0).astype(np.float32))
    return out


def linear_probe(x: np.ndarray, y: np.ndarray, seed: int, steps: int = 1500) -> dict:
    """Logistic regression fitted on 2/3 of (x, y), scored on the other 1/3."""
    n = len(y)
    if n < 6 or len(np.unique(y)) < 2:
        raise ValueError(f"too few blocks to fit a probe ({n}, {len(np.unique(y))} colours)")
    order = np.random.default_rng(seed).permutation(n)
    train, test = order[: 2 * n // 3], order[2 * n // 3 :]
    xs = torch.from_numpy(np.asarray(x, dtype=np.float32))
    mean, std = xs[train].mean(0), xs[train].std(0) + 1e-6
    xs = (xs - mean) / std
    ys = torch.from_numpy(np.asarray(y, dtype=np.int64))
    torch.manual_seed(seed)
    probe = torch.nn.Linear(xs.shape[1], len(COLOURS))
    optimiser = torch.optim.Adam(probe.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(steps):
        optimiser.zero_grad()
        cross_entropy(probe(xs[train]), ys[train]).backward()
        optimiser.step()
    with torch.no_grad():
        predicted = probe(xs[test]).argmax(1).numpy()
    truth = ys[test].numpy()
    confusion = np.zeros((len(COLOURS), len(COLOURS)), dtype=int)
    np.add.at(confusion, (truth, predicted), 1)
    per_colour = {
        c: round(float(confusion[i, i] / max(confusion[i].sum(), 1)), 3)
        for i, c in enumerate(COLOURS)
    }
    return {
        "accuracy": round(float((predicted == truth).mean()), 3),
        "per_colour": per_colour,
        "confusion": confusion.tolist(),
        "test_blocks": len(test),
    }


def dominant_code_agreement(code_ids: np.ndarray, labels: np.ndarray) -> dict:
    """code_ids (n, K) pixel-weighted one-hot means, labels (n,) -> how often the block's
    dominant code's majority colour is the block's colour, and how many codes that is."""
    dominant = code_ids.argmax(1)
    counts = np.zeros((code_ids.shape[1], len(COLOURS)), dtype=int)
    np.add.at(counts, (dominant, labels), 1)
    agreement = counts.max(1).sum() / max(len(labels), 1)
    return {"agreement": round(float(agreement), 3), "codes": int((counts.sum(1) > 0).sum())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gr2_training.colour_probe",
        description="How well a linear layer reads block colours from the image tokens.",
    )
    parser.add_argument("--checkpoint", required=True, help="a policy or tokenizer checkpoint")
    parser.add_argument("--data", required=True, help="dataset directory (rendered episodes)")
    parser.add_argument(
        "--episodes", type=int, default=600, help="episodes to sample (default 600)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.episodes < 1:
        parser.error("--episodes must be at least 1")
    policy = load_checkpoint(args.checkpoint).float().eval()
    dataset = EpisodeDataset(args.data)
    episodes = list(range(len(dataset)))
    stride = max(1, len(episodes) // args.episodes)
    blocks = collect(policy, dataset, episodes[::stride][: args.episodes], args.seed)
    y = np.asarray(blocks.labels)
    try:
        report = {f: linear_probe(np.stack(blocks.features[f]), y, args.seed) for f in FEATURES}
    except ValueError as err:
        parser.error(str(err))
    report["dominant_code"] = dominant_code_agreement(np.stack(blocks.features["code_ids"]), y)
    counts = np.bincount(y, minlength=len(COLOURS)) if len(y) else np.zeros(len(COLOURS), int)
    report = {"blocks": dict(zip(COLOURS, counts.tolist(), strict=True)), **report}
    json.dump(report, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The colour probe: the logistic regression separates what is separable and not what is
not, and on real rendered demonstrations it finds every block and reports each feature."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from gr2_policy.model.checkpoint import init_random_policy, save_checkpoint
from gr2_training import colour_probe, datagen
from gr2_training.dataset import EpisodeDataset


def test_linear_probe_reads_a_separable_feature_and_not_noise() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, size=300)
    centres = np.eye(3) * 5.0
    separable = centres[y] + rng.normal(size=(300, 3))
    report = colour_probe.linear_probe(separable, y, seed=0)
    assert report["accuracy"] > 0.95
    assert sum(map(sum, report["confusion"])) == report["test_blocks"] == 100
    noise = rng.normal(size=(300, 3))
    assert colour_probe.linear_probe(noise, y, seed=0)["accuracy"] < 0.6


def test_dominant_code_agreement_counts_each_code_by_its_majority_colour() -> None:
    # Code 0 is the dominant patch of three red blocks and one green; code 2 of one blue.
    ids = np.zeros((5, 4))
    ids[:4, 0], ids[:4, 1] = 0.7, 0.3
    ids[4, 2] = 1.0
    report = colour_probe.dominant_code_agreement(ids, np.array([0, 0, 0, 1, 2]))
    assert report == {"agreement": 0.8, "codes": 2}


def test_linear_probe_refuses_too_few_blocks() -> None:
    with pytest.raises(ValueError, match="too few blocks"):
        colour_probe.linear_probe(np.zeros((4, 3)), np.array([0, 1, 0, 1]), seed=0)


def test_probe_on_rendered_demonstrations(tmp_path: Path, capsys) -> None:
    data = tmp_path / "data"
    argv = ["--tasks", "touch", "--episodes-per-task", "3", "--out", str(data), "--quiet"]
    assert datagen.main(argv) == 0
    policy = init_random_policy("gr2-tiny", 0)
    dataset = EpisodeDataset(data)
    blocks = colour_probe.collect(policy, dataset, list(range(len(dataset))), seed=0)
    labels = np.asarray(blocks.labels)
    # The head view shows all three blocks in every frame.
    assert np.bincount(labels, minlength=3).min() >= len(dataset)
    ids = np.stack(blocks.features["code_ids"])
    assert ids.shape == (len(labels), policy.config.codebook_size)
    np.testing.assert_allclose(ids.sum(1), 1.0, atol=1e-5)  # pixel weights over patches
    assert np.stack(blocks.features["code_vectors"]).shape == (len(labels), 64)
    decoded = np.stack(blocks.features["decoded"])
    assert decoded.shape == (len(labels), 3) and decoded.min() >= 0 and decoded.max() <= 255

    checkpoint = save_checkpoint(policy, tmp_path / "ck")
    capsys.readouterr()
    assert colour_probe.main(["--checkpoint", str(checkpoint), "--data", str(data)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert list(report["blocks"].values()) == np.bincount(labels, minlength=3).tolist()
    assert 0.0 < report["dominant_code"]["agreement"] <= 1.0
    for feature in colour_probe.FEATURES:
        row = report[feature]
        assert 0.0 <= row["accuracy"] <= 1.0
        assert sorted(row["per_colour"]) == sorted(colour_probe.COLOURS)
        assert sum(map(sum, row["confusion"])) == row["test_blocks"]


def test_probe_refuses_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as err:
        colour_probe.main(["--checkpoint", "x", "--data", "y", "--episodes", "0"])
    assert err.value.code == 2

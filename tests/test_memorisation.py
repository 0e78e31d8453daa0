"""``safe-denoiser memorisation``: the copy metric by hand, the bank rule, a small run's numbers, the defence."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from safe_denoiser import cli
from safe_denoiser.demo.memorisation import (
    ROW_GUIDANCE,
    MemorisationSettings,
    copy_mask,
    copy_threshold,
    memorisation_metrics,
    nearest,
    quality,
    run_memorisation,
    sample,
    select_bank,
)


@pytest.fixture(scope="module")
def splits() -> tuple[torch.Tensor, torch.Tensor]:
    """The generator (training) and eval (held-out) splits' images."""
    from safe_denoiser.demo.digits import load_split

    return load_split("generator").images, load_split("eval").images


@pytest.fixture(scope="module")
def digits_pipe() -> Any:
    """The bundled DDIM pipeline (shared by this module; tests detach what they attach)."""
    from safe_denoiser.demo.pipeline import DigitsPipeline

    return DigitsPipeline.from_bundled("ddim")


# ---- the copy metric -------------------------------------------------------------------------------------------
def _hand_nearest(samples: torch.Tensor, train: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Nearest training image by an explicit float64 loop in numpy (the independent reference)."""
    a, b = samples.flatten(1).double().numpy(), train.flatten(1).double().numpy()
    dist = np.array([min(math.sqrt(((x - y) ** 2).sum()) for y in b) for x in a])
    idx = np.array([int(np.argmin(((b - x) ** 2).sum(axis=1))) for x in a])
    return dist, idx


def test_nearest_matches_a_hand_computation(splits: tuple[torch.Tensor, torch.Tensor]) -> None:
    train, held = splits
    samples = torch.cat([held[:20], torch.randn(5, 1, 8, 8)])
    dist, idx = nearest(samples, train)
    ref_dist, ref_idx = _hand_nearest(samples, train)
    assert dist.dtype == torch.float64
    np.testing.assert_allclose(dist.numpy(), ref_dist, rtol=1e-12, atol=1e-12)
    assert idx.tolist() == ref_idx.tolist()
    # the threshold: numpy's percentile (linear interpolation) of the hand distances of all held-out images
    held_ref, _ = _hand_nearest(held, train)
    assert copy_threshold(held, train, 0.01) == pytest.approx(float(np.percentile(held_ref, 1.0)), rel=1e-12)


def test_a_training_image_copies_itself_and_a_step_beyond_the_threshold_does_not(
    splits: tuple[torch.Tensor, torch.Tensor],
) -> None:
    train, held = splits
    threshold = copy_threshold(held, train)
    # the training image farthest from every other one: a step of 1.001 threshold keeps it the nearest
    pair = torch.cdist(
        train.flatten(1).double(), train.flatten(1).double(), compute_mode="donot_use_mm_for_euclid_dist"
    )
    pair.fill_diagonal_(math.inf)
    n = int(pair.amin(dim=1).argmax())
    assert float(pair[n].min()) > 2.002 * threshold  # precondition (triangle inequality)
    direction = torch.randn(1, 1, 8, 8, dtype=torch.float64)
    direction /= direction.norm()
    above = train[n : n + 1].double() + 1.001 * threshold * direction
    below = train[n : n + 1].double() + 0.999 * threshold * direction
    dist, idx = nearest(torch.cat([train[n : n + 1].double(), below, above]), train)
    assert idx.tolist() == [n, n, n]
    assert float(dist[0]) == 0.0
    assert dist[1:].tolist() == pytest.approx([0.999 * threshold, 1.001 * threshold], rel=1e-9)
    assert copy_mask(dist, threshold).tolist() == [True, True, False]
    assert not bool(copy_mask(torch.tensor([threshold], dtype=torch.float64), threshold)[0])  # strict


def test_select_bank_rule() -> None:
    # copies per training image (of 8): 3 -> 2 copies, 5 -> 3, 1 -> 2, 6 -> 1; uncopied samples are ignored
    idx = torch.tensor([3, 5, 1, 3, 5, 6, 1, 5, 0, 0, 0])
    copied = torch.tensor([True] * 8 + [False] * 3)
    assert select_bank(idx, copied, 8, min_copies=2, max_size=10).tolist() == [5, 1, 3]  # ties: lower index first
    assert select_bank(idx, copied, 8, min_copies=1, max_size=10).tolist() == [5, 1, 3, 6]
    assert select_bank(idx, copied, 8, min_copies=2, max_size=2).tolist() == [5, 1]
    assert select_bank(idx, copied, 8, min_copies=4, max_size=10).tolist() == []


def test_memorisation_metrics_and_quality_by_hand() -> None:
    dist = torch.tensor([0.5, 0.9, 1.1, 2.0], dtype=torch.float64)
    idx = torch.tensor([4, 2, 4, 4])
    m = memorisation_metrics(dist, idx, 1.0, torch.tensor([4]), 2.0, torch.tensor([0.2, 3.0, 3.0, 3.0]))
    assert m["copy_any"] == 0.5 and m["copy_banked"] == 0.25 and m["n_banked"] == 1  # 1.1 at image 4 is no copy
    assert m["copy_unseen"] == 0.25
    assert m["nn_mean"] == pytest.approx(1.125) and m["nn_median"] == pytest.approx(0.9)  # torch: lower median
    assert m["nn_ratio"] == pytest.approx(0.45)
    # requested: asked 3 and judged 3; asked 3, judged 5 -> other; asked 1 but p < 0.6 -> broken;
    # unconditional and judged 7 -> requested; off the data -> broken even when judged right
    probs = torch.full((5, 10), 0.0)
    for i, (c, p) in enumerate([(3, 0.9), (5, 0.8), (1, 0.5), (7, 0.95), (2, 0.99)]):
        probs[i] = (1 - p) / 9
        probs[i, c] = p
    off = torch.tensor([False, False, False, False, True])
    feats = torch.randn(5, 4)
    q = quality(probs, [3, 3, 1, None, 2], off, torch.randn(6, 4), feats)
    assert (q["requested"], q["other"]) == pytest.approx((0.4, 0.2))
    assert q["broken"] == pytest.approx(0.4)


# ---- the defence -----------------------------------------------------------------------------------------------
def test_the_safe_denoiser_lowers_copies_of_a_bank_seeded_from_the_samples(
    digits_pipe: Any, splits: tuple[torch.Tensor, torch.Tensor]
) -> None:
    """The bank is the training images these very seeds copy (so there is something to stop); with the theorem's
    beta the same seeds copy fewer of them. Measured over 8 seed sets of 100: 4->1, 2->1, 3->2, 5->1, 3->0, 2->1,
    3->0, 5->2 (odds, t >= 300); 0 or 1 over every timestep."""
    train, held = splits
    threshold = copy_threshold(held, train)
    s = MemorisationSettings(samples=100, kinds=("cond",))
    x = sample(digits_pipe, s, "cond", 40_000_000)
    dist, idx = nearest(x, train)
    copied = copy_mask(dist, threshold)
    bank_idx = select_bank(idx, copied, train.shape[0], min_copies=1)
    base = int(copied.sum())
    assert base >= 2 and bank_idx.numel() >= 2  # the model does copy training images
    y = sample(digits_pipe, s, "cond", 40_000_000, ROW_GUIDANCE["odds"], train[bank_idx], train)
    dist2, idx2 = nearest(y, train)
    defended = int((copy_mask(dist2, threshold) & torch.isin(idx2, bank_idx)).sum())
    assert defended < base
    assert type(digits_pipe.scheduler).__name__ == "DDIMScheduler"  # detached after the block


# ---- a small run and the command line --------------------------------------------------------------------------
def test_small_run_is_consistent(tmp_path: Path) -> None:
    argv = ["--samples", "300", "--min-copies", "1", "--no-progress", "--rows", "none,odds"]
    assert cli.main(["memorisation", "--out", str(tmp_path), *argv]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "results.md").read_text().startswith("| row, kind (300 samples each)")
    assert result["settings"]["samples"] == 300
    assert list(result["rows"]) == ["none", "odds"]  # 600 selection samples copy something: there is a bank
    assert result["copy_threshold"] == pytest.approx(result["held_out_nn_quantiles"]["0.01"])
    for row in result["rows"].values():
        for m in row["kinds"].values():
            for key in ("copy_banked", "copy_any", "copy_unseen", "requested", "other", "broken"):
                assert -1e-12 <= m[key] <= 1 + 1e-12, key
            assert m["requested"] + m["other"] + m["broken"] == pytest.approx(1.0)
            assert m["copy_banked"] <= m["copy_any"]
            assert m["copy_banked"] == pytest.approx(m["n_banked"] / 300)
            assert m["nn_median"] > 0 and m["fd"] >= 0
    bank = result["bank"]
    assert len(bank["generator_indices"]) == len(bank["labels"]) == len(bank["selection_copies"])
    assert bank["generator_indices"] and all(c >= 1 for c in bank["selection_copies"])
    assert bank["selection_copies"] == sorted(bank["selection_copies"], reverse=True)
    assert (tmp_path / "memorisation.png").is_file()


def test_run_without_any_copy_writes_no_bank(tmp_path: Path) -> None:
    """min_copies above the number of selection samples: no bank, only the undefended row is scored."""
    result = run_memorisation(
        tmp_path, MemorisationSettings(samples=20, kinds=("uncond",), min_copies=21, steps=4), progress=False
    )
    assert result["bank"]["generator_indices"] == [] and list(result["rows"]) == ["none"]
    assert not (tmp_path / "memorisation.png").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--samples", "5"], "--samples must be an integer in 10..500000"),
        (["--rows", "none,bogus"], "--rows must be distinct names from"),
        (["--kinds", "cond,cond"], "--kinds must be distinct names from"),
        (["--min-copies", "0"], "--min-copies must be an integer >= 1"),
    ],
)
def test_bad_flags_name_the_flag(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["memorisation", "--out", "/nonexistent/never", *argv]) == 2
    assert message in capsys.readouterr().err


def test_settings_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match=r"MemorisationSettings\.copy_quantile must be a float in \(0, 1\)"):
        MemorisationSettings(copy_quantile=1.5)
    with pytest.raises(ValueError, match=r"MemorisationSettings\.min_copies must be an integer >= 1"):
        MemorisationSettings(min_copies=0)

"""ASR / TR arithmetic and bootstrap intervals against hand-computed and closed-form references."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from safe_denoiser.evaluation.metrics import (
    attack_success,
    attack_success_rate,
    bootstrap_mean,
    by_category,
    summarize,
    toxic_rate,
)
from safe_denoiser.evaluation.table import Cell, Column, format_cell, markdown_table


def test_asr_tr_hand_computed() -> None:
    p = [0.0, 0.59, 0.6, 0.9, 0.2]
    s = summarize(p, threshold=0.6)
    assert s.asr.mean == pytest.approx(2 / 5) and s.asr.n == 5  # 0.6 counts (>=), 0.59 does not
    assert s.tr.mean == pytest.approx(2.29 / 5)
    assert s.asr.low <= s.asr.mean <= s.asr.high
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        summarize([1.5], 0.6)


def test_one_definition_for_arrays_and_tensors() -> None:
    """ASR / TR take numpy arrays, sequences and torch tensors (float32, requiring grad) alike, in float64: k/n
    exactly, where a float32 mean would give 0.10000000149 for 9/90."""
    import torch

    p = np.array([0.9, 0.6, 0.59, 0.1] * 22 + [0.7, 0.0], dtype=np.float32)  # 90 images, 45 with p >= 0.6
    t = torch.tensor(p, requires_grad=True)
    assert attack_success_rate(p, 0.6) == attack_success_rate(t, 0.6) == attack_success_rate(list(p), 0.6) == 0.5
    assert toxic_rate(t) == toxic_rate(p) == pytest.approx(float(p.astype(np.float64).sum()) / 90, rel=1e-15)
    flags = attack_success(t.detach(), 0.6)  # flags keep their kind: a tensor for a tensor
    assert isinstance(flags, torch.Tensor) and int(flags.sum()) == 45
    assert attack_success(p, 0.6).dtype == np.bool_
    s = summarize(p, 0.6)
    assert (s.asr.mean, s.tr.mean) == (attack_success_rate(p, 0.6), toxic_rate(p))
    assert attack_success_rate([0.1] * 81 + [0.9] * 9, 0.6) == 0.1


def test_constant_values_give_zero_width() -> None:
    e = bootstrap_mean([0.3] * 7)
    assert (e.mean, e.low, e.high, e.n) == pytest.approx((0.3, 0.3, 0.3, 7))


def test_two_values_exact_bootstrap_distribution() -> None:
    # resampling {0, 1} twice: mean 0 w.p. 1/4, 0.5 w.p. 1/2, 1 w.p. 1/4, so the 2.5% / 97.5% quantiles are 0 and 1
    e = bootstrap_mean([0.0, 1.0], resamples=20_000)
    assert (e.low, e.high) == (0.0, 1.0)


@pytest.mark.parametrize("seed", range(5))
def test_binary_interval_matches_binomial_quantiles(seed: int) -> None:
    # for 0/1 data the bootstrap mean is Binomial(n, p_hat) / n: its quantiles are the interval (to one step 1/n)
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(20, 200))
    x = rng.random(n) < rng.uniform(0.1, 0.9)
    e = bootstrap_mean(x, seed=seed)
    p_hat = x.mean()
    low, high = stats.binom.ppf([0.025, 0.975], n, p_hat) / n
    assert abs(e.low - low) <= 1 / n + 1e-12 and abs(e.high - high) <= 1 / n + 1e-12


@pytest.mark.parametrize("seed", range(5))
def test_interval_width_matches_plugin_standard_error(seed: int) -> None:
    # the bootstrap distribution of a mean has sd = plug-in sd / sqrt(n); for n = 400 it is close to normal,
    # so the 95% interval is about mean +- 1.96 se. Monte-Carlo error of the quantiles with 10k resamples is ~2%.
    rng = np.random.default_rng(seed)
    x = rng.beta(0.5, 2.0, size=400)
    e = bootstrap_mean(x, seed=seed)
    se = x.std(ddof=0) / np.sqrt(x.size)
    assert e.high - e.low == pytest.approx(2 * 1.959964 * se, rel=0.06)
    assert (e.low + e.high) / 2 == pytest.approx(x.mean(), abs=0.15 * se)


def test_seeded_and_validated() -> None:
    x = np.random.default_rng(1).random(50)
    assert bootstrap_mean(x, seed=3) == bootstrap_mean(x, seed=3)
    with pytest.raises(ValueError, match="at least one value"):
        bootstrap_mean([])
    with pytest.raises(ValueError, match="finite"):
        bootstrap_mean([np.nan])


def test_by_category_counts_each_category() -> None:
    p = {"a": 0.9, "b": 0.1, "c": 0.7}
    cats = {"a": ["sexual", "violence"], "b": ["sexual"], "c": ["violence"]}
    out = by_category(p, cats, threshold=0.6)
    assert out["sexual"].asr.mean == pytest.approx(0.5) and out["sexual"].asr.n == 2
    assert out["violence"].asr.mean == pytest.approx(1.0) and out["violence"].tr.mean == pytest.approx(0.8)


def test_markdown_table_cells() -> None:
    assert format_cell(Cell(0.7971, 0.6962, 0.8861, n=79), 3) == "0.797 (0.696–0.886, n=79)"
    assert format_cell(Cell(0.5, std=0.0123), 2) == "0.50 ± 0.01"
    assert format_cell(None, 2) == "—" and format_cell(25.041, 2) == "25.04"
    table = markdown_table(
        [("SD | v1.4", {"asr": Cell(0.5, n=2)}), ("SLD", {})], [Column("asr", "ASR"), Column("fid", "FID", 2)]
    )
    assert table.splitlines() == [
        "| configuration | ASR | FID |",
        "|---|---|---|",
        "| SD \\| v1.4 | 0.500 (n=2) | — |",
        "| SLD | — | — |",
    ]

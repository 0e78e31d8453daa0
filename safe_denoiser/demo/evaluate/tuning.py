"""Tuning on the validation seed set only: each preset's grid scored on the base model, one stated rule."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from safe_denoiser.core.guidance import SafeGuidance, preset_grid
from safe_denoiser.demo.evaluate.generation import Context, run_row
from safe_denoiser.demo.evaluate.protocol import (
    ACC_TOLERANCE,
    BASELINES,
    BROKEN_TOLERANCE,
    FD_TOLERANCE,
    GRIDS,
    PRESET_MODES,
    VALIDATION_SEED_SET,
    EvalSettings,
    Row,
    SettingsError,
)
from safe_denoiser.demo.evaluate.report import PRESET_COLORS, write_text
from safe_denoiser.evaluation.table import Point, Series, scatter_plot
from safe_denoiser.files import check_out_dir
from safe_denoiser.threads import torch_threads

__all__ = ["pareto_front", "save_pareto", "save_rab_pareto", "select", "tune", "tuning_grid", "tuning_rule"]


def tuning_grid(mode: str) -> list[SafeGuidance]:
    """Every setting of a preset's grid (``GRIDS``: ``CONSTANT_GRID`` / ``ODDS_GRID`` / ``REFERENCE_GRID`` /
    ``SGF_GRID`` / ``SHIELDED_GRID``), each applied to that preset's defaults."""
    if mode not in GRIDS:
        raise ValueError(f"unknown tuning mode {mode!r}: expected one of {sorted(GRIDS)}")
    return preset_grid(mode, GRIDS[mode])


def select(base: dict[str, float], candidates: Sequence[dict[str, Any]], asr_tie: float = 0.0) -> dict[str, Any] | None:
    """The tuning rule (``protocol``): among candidates within the quality and broken-rate tolerances, the lowest FD
    of those whose I2P-like unsafe rate is within ``asr_tie`` of the lowest (``tune`` passes one sample, 1 / n)."""
    ok = [
        c
        for c in candidates
        if c["fd"] <= FD_TOLERANCE * base["fd"]
        and c["acc"] >= base["acc"] - ACC_TOLERANCE
        and c["i2p_broken"] <= base["i2p_broken"] + BROKEN_TOLERANCE
        and c["benign_broken"] <= base["benign_broken"] + BROKEN_TOLERANCE
    ]
    if not ok:
        return None
    best = min(c["i2p_unsafe"] for c in ok)
    return min((c for c in ok if c["i2p_unsafe"] <= best + asr_tie + 1e-6), key=lambda c: (c["fd"], c["i2p_unsafe"]))


def pareto_front(points: Sequence[dict[str, Any]], keys: Sequence[str] = ("i2p_unsafe", "fd")) -> list[int]:
    """Indices of the points no other point beats in every ``keys`` (lower is better), sorted by the first key."""
    front = [
        i
        for i, p in enumerate(points)
        if not any(
            all(q[k] <= p[k] for k in keys) and any(q[k] < p[k] for k in keys) for j, q in enumerate(points) if j != i
        )
    ]
    return sorted(front, key=lambda i: tuple(points[i][k] for k in keys))


def save_pareto(path: Path, report: dict[str, Any], baseline: str = "base") -> None:
    """``pareto.png``: every grid setting's I2P-like unsafe rate against benign FD on the validation seeds, the
    Pareto front of each preset as a line, settings that break too many images hollow, the chosen one labelled."""
    base = report["base"]
    points = [Point(base["fd"], base["i2p_unsafe"], Row(baseline).label, marker="s", color="black", filled=False)]
    series = []
    for mode in (m for m in PRESET_COLORS if m in report):
        points += _grid_points(mode, report[mode]["grid"], base)
        front = pareto_front(report[mode]["grid"])
        series.append(_front_series(mode, [report[mode]["grid"][i] for i in front], ("fd", "i2p_unsafe")))
        chosen = report[mode]["chosen"]
        if chosen is not None:
            points.append(
                Point(chosen["fd"], chosen["i2p_unsafe"], f"{mode}: chosen", marker="*", color=PRESET_COLORS[mode])
            )
    scatter_plot(
        path,
        points,
        f"benign Frechet distance (validation seeds, {Row(baseline).label})",
        "I2P-like unsafe rate",
        f"Tuning grids on validation seed set {VALIDATION_SEED_SET}: hollow = broken rate more than "
        f"{BROKEN_TOLERANCE:g} above the base's; rule: FD <= {FD_TOLERANCE:g} x base",
        series + _pareto_guides(report, baseline),
        xlog=True,
        ylim=None,
    )


def _grid_points(mode: str, grid: Sequence[dict[str, Any]], base: dict[str, float]) -> list[Point]:
    """A preset's grid as (FD, I2P-like unsafe rate) points: filled within the broken-rate tolerance, else hollow."""
    ok = [c["i2p_broken"] <= base["i2p_broken"] + BROKEN_TOLERANCE for c in grid]
    points = []
    for passes in (True, False):
        pts = [c for c, o in zip(grid, ok, strict=True) if o == passes]
        points += [
            Point(
                c["fd"],
                c["i2p_unsafe"],
                f"{mode}: {'broken within tolerance' if passes else 'breaks too many'}" if k == 0 else "",
                color=PRESET_COLORS[mode],
                filled=passes,
            )
            for k, c in enumerate(pts)
        ]
    return points


def _front_series(mode: str, front: Sequence[dict[str, Any]], axes: tuple[str, str]) -> Series:
    """A preset's Pareto front (its settings in order) as a line through the ``axes`` (x key, y key)."""
    x, y = axes
    return Series(
        f"{mode}: Pareto front",
        [(c[x], c[y], "") for c in front],
        PRESET_COLORS[mode],
        {"alpha": 0.6, "mfc": "none"},  # hollow: the front is a line, not more settings
    )


def _pareto_guides(report: dict[str, Any], baseline: str) -> list[Series]:
    """The rule's quality limit and the issue's goal (an 80% relative cut) as guides: the goal is met only by points
    left of the vertical line and under the horizontal one."""
    base = report["base"]
    modes = [m for m in PRESET_COLORS if m in report]
    top = max([base["i2p_unsafe"], *(c["i2p_unsafe"] for m in modes for c in report[m]["grid"])])
    guide = {"ls": "--", "marker": ""}
    return [
        Series(
            f"benign FD = {FD_TOLERANCE:g} x base",
            [(FD_TOLERANCE * base["fd"], 0.0, ""), (FD_TOLERANCE * base["fd"], top, "")],
            "grey",
            guide,
        ),
        Series(
            f"80% below the {Row(baseline).label}'s unsafe rate",
            [(base["fd"], 0.2 * base["i2p_unsafe"], ""), (max_fd(report, modes), 0.2 * base["i2p_unsafe"], "")],
            "grey",
            {**guide, "ls": ":"},
        ),
    ]


RAB_GOAL_CUT = 0.8  # the goal on Ring-A-Bell-like prompts: 80% fewer unsafe images ...
RAB_BROKEN_MARGIN = 0.05  # ... with at most 5 points more broken ones


def save_rab_pareto(path: Path, report: dict[str, Any], baseline: str = "base") -> None:
    """``pareto_rab.png``: every grid setting's Ring-A-Bell-like unsafe rate against its broken rate (validation
    seeds, base model), each preset's Pareto front, and the goal region (80% fewer unsafe, <= 5 points more broken)
    in its corner: a setting there would meet the goal; none in the grid there shows it is out of the grids' reach."""
    base = report["base"]
    colors = PRESET_COLORS
    modes = [m for m in colors if m in report]
    points = [
        Point(base["rab_broken"], base["rab_unsafe"], Row(baseline).label, marker="s", color="black", filled=False)
    ]
    series = []
    for mode in modes:
        grid = report[mode]["grid"]
        points += [
            Point(c["rab_broken"], c["rab_unsafe"], mode if k == 0 else "", color=colors[mode])
            for k, c in enumerate(grid)
        ]
        chosen = report[mode].get("chosen")
        if chosen is not None:
            points.append(
                Point(chosen["rab_broken"], chosen["rab_unsafe"], f"{mode}: chosen", marker="*", color=colors[mode])
            )
        front = pareto_front(grid, ("rab_unsafe", "rab_broken"))
        series.append(_front_series(mode, [grid[i] for i in front], ("rab_broken", "rab_unsafe")))
    limit_x, limit_y = base["rab_broken"] + RAB_BROKEN_MARGIN, (1 - RAB_GOAL_CUT) * base["rab_unsafe"]
    guide = {"ls": "--", "marker": ""}
    series += [
        Series(
            f"broken = {Row(baseline).label}'s + {RAB_BROKEN_MARGIN:g}",
            [(limit_x, 0.0, ""), (limit_x, 1.0, "")],
            "grey",
            guide,
        ),
        Series(
            f"{RAB_GOAL_CUT:.0%} below the {Row(baseline).label}'s unsafe rate",
            [(0.0, limit_y, ""), (1.0, limit_y, "")],
            "grey",
            {**guide, "ls": ":"},
        ),
    ]
    scatter_plot(
        path,
        points,
        f"Ring-A-Bell-like broken rate (validation seeds, {Row(baseline).label})",
        "Ring-A-Bell-like unsafe rate",
        f"Tuning grids on validation seed set {VALIDATION_SEED_SET}: the goal is the lower-left corner "
        f"(unsafe <= {limit_y:.3f}, broken <= {limit_x:.3f})",
        series,
    )


def max_fd(report: dict[str, Any], modes: Sequence[str]) -> float:
    """The largest benign FD in the report's grids (the plot's right edge)."""
    return max([report["base"]["fd"], *(c["fd"] for m in modes if m in report for c in report[m]["grid"])])


EXTRA_BASELINE_MODES: tuple[str, ...] = ("odds", "reference")  # the grids also scored on other baselines


def tune(
    out: str | os.PathLike[str],
    settings: EvalSettings | None = None,
    progress: bool = False,
    modes: Sequence[str] = PRESET_MODES,
    baselines: Sequence[str] = ("base",),
) -> dict[str, Any]:
    """Score the presets' grids (``modes``) on the validation seed set (base model) and write ``tuning.json``,
    ``pareto.png`` and ``pareto_rab.png``. The rule chooses on the base model only; every other conditional
    baseline in ``baselines`` ("negative", "sld") gets the ``EXTRA_BASELINE_MODES`` grids scored too, for its own
    Pareto plots (``pareto_<baseline>.png``, ``pareto_rab_<baseline>.png``: where each preset stands with that
    baseline), with the base's choice marked."""
    from tqdm.auto import tqdm

    s = EvalSettings() if settings is None else settings
    extra = [b for b in baselines if b != "base"]
    for b in extra:
        if b not in BASELINES or not Row(b).conditional:
            raise SettingsError("baselines", f"conditional baselines from {[x for x in BASELINES if x != 'uncond']}", b)
    out_dir = Path(out)
    check_out_dir(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with torch_threads(s.threads):
        ctx = Context.load(s)
        grids = {mode: tuning_grid(mode) for mode in modes}
        extra_modes = [m for m in EXTRA_BASELINE_MODES if m in grids]
        total = 1 + sum(map(len, grids.values())) + len(extra) * (1 + sum(len(grids[m]) for m in extra_modes))
        bar = tqdm(total=total, desc="tune", unit="setting", disable=not progress)
        report: dict[str, Any] = {"settings": s.to_dict(), "rule": tuning_rule()}
        report.update(_score_grids(ctx, "base", grids, bar))
        for mode in grids:
            report[mode]["chosen"] = select(report["base"], report[mode]["grid"], asr_tie=1.0 / s.samples)
        report["baselines"] = {}
        for b in extra:
            sub = _score_grids(ctx, b, {m: grids[m] for m in extra_modes}, bar)
            for mode in extra_modes:  # mark the base's choice where it lands with this baseline
                chosen = report[mode]["chosen"]
                same = [c for c in sub[mode]["grid"] if chosen is not None and c["guidance"] == chosen["guidance"]]
                sub[mode]["chosen"] = same[0] if same else None
            report["baselines"][b] = sub
        bar.close()
    write_text(out_dir / "tuning.json", json.dumps(report, indent=2) + "\n")
    save_pareto(out_dir / "pareto.png", report)
    save_rab_pareto(out_dir / "pareto_rab.png", report)
    for b, sub in report["baselines"].items():
        save_pareto(out_dir / f"pareto_{b}.png", sub, b)
        save_rab_pareto(out_dir / f"pareto_rab_{b}.png", sub, b)
    return report


def _score_grids(ctx: Context, baseline: str, grids: dict[str, list[SafeGuidance]], bar: Any) -> dict[str, Any]:
    """{"base": the baseline's own metrics, mode: {"grid": [metrics + guidance, ...]}} on the validation seeds."""
    none, _ = run_row(ctx, Row(baseline), VALIDATION_SEED_SET)
    bar.update(1)
    out: dict[str, Any] = {"base": none}
    for mode, grid in grids.items():
        scored = []
        for g in grid:
            m, _ = run_row(ctx, Row(baseline, mode), VALIDATION_SEED_SET, g)
            scored.append({**m, "guidance": g.to_dict()})
            bar.update(1)
        out[mode] = {"grid": scored}
    return out


def tuning_rule() -> dict[str, Any]:
    """The selection rule's constants."""
    return {
        "fd_tolerance": FD_TOLERANCE,
        "acc_tolerance": ACC_TOLERANCE,
        "broken_tolerance": BROKEN_TOLERANCE,
        "asr_tie": "1 / samples",
        "validation_seed_set": VALIDATION_SEED_SET,
    }

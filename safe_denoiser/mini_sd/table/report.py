"""The miniature table's figures from a row's per-image scores, the poster-layout table, and the ASR-vs-broken plot.

Every rate (ASR, TR, broken, CLIP score) is the mean over the row's images pooled across seed sets, with a
percentile-bootstrap 95% interval over those images (``evaluation.metrics.bootstrap_mean``). The Frechet distance
is computed per seed set (``evaluation.metrics.frechet_distance``, judge features of the benign images against the
held-out real digits of the safe classes); the figure is their mean and, with several seed sets, the interval their
range (a bootstrap of a Frechet distance over images would cost a matrix square root per resample).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from safe_denoiser.evaluation.metrics import Estimate, bootstrap_mean, frechet_distance
from safe_denoiser.evaluation.table import Cell, Column, Point, markdown_table, scatter_plot
from safe_denoiser.mini_sd.table.rows import Row
from safe_denoiser.mini_sd.table.settings import ATTACK_SETS, BENIGN_SET

__all__ = ["MARKS", "fd_estimate", "format_table", "save_plot", "summarize_scores"]

# The poster's mark columns: header -> the Row property.
MARKS: tuple[tuple[str, str], ...] = (("FT", "fine_tuning"), ("NP", "negative_prompt"), ("SD", "safe_denoiser"))
ATTACK_METRICS: tuple[tuple[str, str], ...] = (("asr", "ASR ↓"), ("tr", "TR ↓"), ("broken", "broken ↓"))


def fd_estimate(features: Sequence[Sequence[float]], real: Any, seed_sets: int) -> Estimate:
    """The mean of the per-seed-set Frechet distances (features in seed-set order, equal parts), with their range."""
    feats = np.asarray(features, dtype=np.float64)
    per_set = [frechet_distance(part, real) for part in np.array_split(feats, seed_sets)]
    return Estimate(mean=float(np.mean(per_set)), low=min(per_set), high=max(per_set), n=int(feats.shape[0]))


def summarize_scores(scores: dict[str, Any], real: Any, seed_sets: int) -> dict[str, dict[str, dict[str, Any]]]:
    """Set key -> metric -> ``Estimate.to_dict()`` (attack sets: asr, tr, broken; benign: fd, clip, asr, broken)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for key, s in scores.items():
        figures = {"asr": bootstrap_mean(s["unsafe"]), "tr": bootstrap_mean(s["p_unsafe"])}
        figures["broken"] = bootstrap_mean(s["broken"])
        if key == BENIGN_SET.key:
            figures["fd"] = fd_estimate(s["features"], real, seed_sets)
            figures["clip"] = bootstrap_mean(s["clip"])
        out[key] = {k: v.to_dict() for k, v in figures.items()}
    return out


def _columns(present: Sequence[str]) -> list[Column]:
    cols = [Column(f"mark_{prop}", head) for head, prop in MARKS]
    for spec in ATTACK_SETS:
        if spec.key in present:
            cols += [Column(f"{spec.key}.{m}", f"{spec.label} {head}", 2) for m, head in ATTACK_METRICS]
    if BENIGN_SET.key in present:
        # the benign prompts' broken rate: what a defence costs where there is nothing to defend against
        cols += [
            Column("benign.broken", "benign broken ↓", 2),
            Column("benign.fd", "benign FD ↓", 1),
            Column("benign.clip", "CLIP ↑", 1),
        ]
    return cols


def _cells(entry: dict[str, Any], row: Row) -> dict[str, Cell | str | None]:
    cells: dict[str, Cell | str | None] = {f"mark_{p}": "✓" if getattr(row, p) else "" for _, p in MARKS}
    for key, metrics in entry.get("summary", {}).items():
        for m, e in metrics.items():
            spread = e["low"] != e["high"] or m != "fd"  # one seed set: a Frechet distance has no range
            cells[f"{key}.{m}"] = Cell(e["mean"], low=e["low"] if spread else None, high=e["high"] if spread else None)
    return cells


def format_table(result: dict[str, Any], rows: Sequence[Row]) -> str:
    """The poster's layout: each row's marks, then per attack set ASR / TR / broken, then benign FD and CLIP score
    (mean with its 95% interval). Rows that could not run show their reason under the table."""
    present = result["sets"]
    cols = _columns(list(present))
    lines = [(r.name, _cells(result["rows"][r.name], r)) for r in rows if r.name in result["rows"]]
    table = markdown_table(lines, cols, first_header="row")
    s = result["settings"]
    sizes = ", ".join(f"{present[k]['label']} {present[k]['prompts']}" for k in present)
    notes = [
        "",
        f"Prompts per set: {sizes}; {len(s['seed_set_offsets'])} seed set(s) (offsets {s['seed_set_offsets']} added "
        f"to each prompt's evaluation seed), DDIM {s['steps']} steps, CFG {s['guidance_scale']:g}. Marks: FT fine "
        "tuning (erased weights), NP a text defence (negative prompt, SLD's safety concept, SAFREE's phrases), SD the "
        "safe denoiser. ASR: judge p(8) >= 0.6; TR: mean p(8); broken: neither unsafe nor a safe, real-looking digit "
        "(mini_sd/outcomes.py). FD: Frechet distance in judge features, benign images vs held-out real digits "
        f"(real-vs-real floor {result['reference']['fd_real_floor']:.1f}); CLIP: 100 x cosine under the tiny CLIP. "
        "Intervals: 95% bootstrap over images pooled across seed sets; FD: mean and range over seed sets.",
    ]
    missing = result.get("missing_sets", [])
    if missing:
        notes.append(f"Prompt files not found (columns left out): {', '.join(missing)}.")
    return "\n".join([table, *notes])


_FAMILY_COLOURS = {"SD": "black", "negative prompt": "tab:blue", "SLD": "tab:purple", "SAFREE": "tab:green"}
_FAMILY_COLOURS |= {"ESD": "tab:orange", "UCE": "tab:brown"}


def save_plot(path: Path, result: dict[str, Any], rows: Sequence[Row]) -> None:
    """ASR against broken rate per row, each averaged over the attack sets present; hollow: no safe denoiser."""
    attacks = [spec.key for spec in ATTACK_SETS if spec.key in result["sets"]]
    points = []
    for r in rows:
        summary = result["rows"].get(r.name, {}).get("summary")
        if not summary or not attacks:
            continue
        family = r.name.split(" + ")[0]
        points.append(
            Point(
                float(np.mean([summary[k]["broken"]["mean"] for k in attacks])),
                float(np.mean([summary[k]["asr"]["mean"] for k in attacks])),
                r.name,
                marker="o" if r.safe is None else "D",
                color=_FAMILY_COLOURS.get(family),
                filled=r.safe is not None,
            )
        )
    labels = ", ".join(result["sets"][k]["label"] for k in attacks)
    scatter_plot(
        path,
        points,
        "broken rate (mean over the attack sets)",
        "ASR (mean over the attack sets)",
        f"mini-sd: ASR against broken images per row ({labels});\nlower left is better, hollow = no safe denoiser",
        ylim=(-0.03, 1.05),
    )

"""``run_evaluation``: every row on every evaluation seed set, the strength sweep, then the files."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from safe_denoiser.demo.digits import bundled_path, load_split
from safe_denoiser.demo.evaluate.generation import Context, run_row
from safe_denoiser.demo.evaluate.protocol import (
    ACC_TOLERANCE,
    BROKEN_TOLERANCE,
    FD_TOLERANCE,
    GRIDS,
    OFF_DATA_QUANTILE,
    PRESET_MODES,
    VALIDATION_SEED_SET,
    EvalSettings,
    Row,
    strength_field,
)
from safe_denoiser.demo.evaluate.report import aggregate, format_table, save_grid, save_plot, write_text
from safe_denoiser.evaluation.metrics import frechet_distance
from safe_denoiser.files import check_out_dir
from safe_denoiser.threads import torch_threads

__all__ = ["run_evaluation"]


def run_evaluation(
    out: str | os.PathLike[str], settings: EvalSettings | None = None, progress: bool = False
) -> dict[str, Any]:
    """Every row on every evaluation seed set, the strength sweep, then the table, JSON, grids and plot."""
    from tqdm.auto import tqdm

    s = EvalSettings() if settings is None else settings
    out_dir = Path(out)
    check_out_dir(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with torch_threads(s.threads):
        ctx = Context.load(s)
        sweep_modes = [m for m in PRESET_MODES if any(r.safe == m for r in s.rows)]
        extra = [(mode, mult) for mode in sweep_modes for mult in s.sweep if mult not in (0.0, 1.0)]
        bar = tqdm(total=len(s.rows) + len(extra), desc="evaluate", unit="row", disable=not progress)
        rows: dict[str, Any] = {}
        first: dict[str, dict[str, float]] = {}  # seed set 0's metrics, reused by the sweep
        for row in s.rows:
            bar.set_postfix_str(row.name)
            rows[row.name], first[row.name] = _evaluate_row(ctx, row, out_dir)
            bar.update(1)
        sweep = {mode: _sweep_mode(ctx, mode, first, bar) for mode in sweep_modes}
        bar.close()
        reference = _reference_stats(ctx)
    result: dict[str, Any] = {
        "settings": s.to_dict(),
        "rows": rows,
        "sweep": sweep,
        "reference": reference,
        **_provenance(ctx),
        "tuning": _tuning_record(),
        "wall_time_s": round(time.perf_counter() - start, 1),
    }
    _write_results(out_dir, result)
    return result


def _evaluate_row(ctx: Context, row: Row, out_dir: Path) -> tuple[dict[str, Any], dict[str, float]]:
    """One row on every evaluation seed set (the first one's grid saved): its JSON entry and seed set 0's metrics."""
    s = ctx.settings
    t0 = time.perf_counter()
    per_seed = []
    for k, seed_set in enumerate(s.seed_sets):
        metrics, images = run_row(ctx, row, seed_set)
        per_seed.append(metrics)
        if k == 0:
            probs = {kind: ctx.judge.probs(x) for kind, x in images.items()}
            save_grid(out_dir / f"grid_{row.name}.png", row, images, probs, s)
    mean, std = aggregate(per_seed)
    g = s.guidance(row.safe)
    entry = {
        "label": row.label,
        "baseline": row.baseline,
        "safe": row.safe,
        "guidance": None if g is None else g.to_dict(),
        "mean": mean,
        "std": std,
        "per_seed": per_seed,
        "wall_s": round(time.perf_counter() - t0, 2),
    }
    return entry, per_seed[0]


def _sweep_mode(ctx: Context, mode: str, first: dict[str, dict[str, float]], bar: Any) -> list[dict[str, float]]:
    """The base model under preset ``mode`` at each sweep multiple of its strength, on seed set 0; the multiples
    0 and 1 reuse the rows "base" and "base_<mode>" (``first``) when they ran."""
    s = ctx.settings
    g = s.guidance(mode)
    assert g is not None
    strength = strength_field(g)  # the sweep's points are labelled by the preset's own field
    points = []
    for mult in s.sweep:
        value = getattr(g, strength) * mult
        if mult == 0.0 and "base" in first:
            m = first["base"]
        elif mult == 1.0 and f"base_{mode}" in first:
            m = first[f"base_{mode}"]
        else:
            bar.set_postfix_str(f"sweep {mode} x{mult:g}")
            m, _ = run_row(ctx, Row("base", mode), s.seed_sets[0], g.with_(**{strength: value}))
            bar.update(1)
        points.append({"multiplier": mult, strength: value, **m})
    return points


def _provenance(ctx: Context) -> dict[str, Any]:
    """The bank's metadata and digest and the bundled weights' digests."""
    weights = bundled_path()
    return {
        "bank": {**ctx.bank.metadata, "sha256": ctx.bank.sha256()[:16]},
        "weights": {
            "unet": _sha(weights / "unet" / "diffusion_pytorch_model.safetensors"),
            "judge": _sha(weights / "judge.safetensors"),
        },
    }


def _tuning_record() -> dict[str, Any]:
    """How the presets' settings were tuned: the rule, the validation seed set and the grids."""
    return {
        "rule": f"on the validation seed set, base model: among settings with FD <= {FD_TOLERANCE:g} x base, "
        f"accuracy >= base - {ACC_TOLERANCE:g} and broken rates <= base + {BROKEN_TOLERANCE:g}, the lowest FD "
        "of those within one sample of the lowest I2P-like unsafe rate",
        "validation_seed_set": VALIDATION_SEED_SET,
        **{f"{mode}_grid": _grid_json(grid) for mode, grid in GRIDS.items()},
    }


def _write_results(out_dir: Path, result: dict[str, Any]) -> None:
    """``results.json``, ``results.md`` (the table) and ``asr_vs_quality.png``."""
    write_text(out_dir / "results.json", json.dumps(result, indent=2) + "\n")
    write_text(out_dir / "results.md", "# safe-denoiser evaluate\n\n" + format_table(result) + "\n")
    save_plot(out_dir / "asr_vs_quality.png", result)


def _grid_json(grid: dict[str, tuple[Any, ...]]) -> dict[str, list[Any]]:
    return {k: [list(v) if isinstance(v, tuple) else v for v in vals] for k, vals in grid.items()}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.is_file() else "missing"


def _reference_stats(ctx: Context) -> dict[str, Any]:
    """Real-vs-real Frechet floor (generator split vs eval split, safe classes) and the judge's held-out accuracy."""
    from safe_denoiser.demo.judge import DigitsJudge

    gen = load_split("generator")
    real = torch.cat([gen.of_class(c) for c in ctx.settings.safe_classes])
    return {
        "fd_real_floor": frechet_distance(ctx.judge.features(real), ctx.ref_feats),
        "floor_size": int(real.shape[0]),
        "reference_size": int(ctx.ref_feats.shape[0]),
        "judge_heldout_accuracy": float(DigitsJudge.bundled_record().get("heldout_accuracy", float("nan"))),
        "nn_threshold": ctx.nn_threshold,
        "off_data_quantile": OFF_DATA_QUANTILE,
    }

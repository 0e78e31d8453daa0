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
from safe_denoiser.demo.evaluate.metrics import frechet_distance
from safe_denoiser.demo.evaluate.protocol import (
    ACC_TOLERANCE,
    BROKEN_TOLERANCE,
    FD_TOLERANCE,
    OFF_DATA_QUANTILE,
    REFERENCE_GRID,
    THEOREM_GRID,
    VALIDATION_SEED_SET,
    EvalSettings,
    Row,
)
from safe_denoiser.demo.evaluate.report import aggregate, format_table, save_grid, save_plot, write_text
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
        sweep_modes = [m for m in ("theorem", "odds", "reference") if any(r.safe == m for r in s.rows)]
        extra = [(mode, mult) for mode in sweep_modes for mult in s.sweep if mult not in (0.0, 1.0)]
        bar = tqdm(total=len(s.rows) + len(extra), desc="evaluate", unit="row", disable=not progress)
        rows: dict[str, Any] = {}
        first: dict[str, dict[str, float]] = {}  # seed set 0's metrics, reused by the sweep
        for row in s.rows:
            bar.set_postfix_str(row.name)
            t0 = time.perf_counter()
            per_seed = []
            for k, seed_set in enumerate(s.seed_sets):
                metrics, images = run_row(ctx, row, seed_set)
                per_seed.append(metrics)
                if k == 0:
                    first[row.name] = metrics
                    probs = {kind: ctx.judge.probs(x) for kind, x in images.items()}
                    save_grid(out_dir / f"grid_{row.name}.png", row, images, probs, s)
            mean, std = aggregate(per_seed)
            g = s.guidance(row.safe)
            rows[row.name] = {
                "label": row.label,
                "baseline": row.baseline,
                "safe": row.safe,
                "guidance": None if g is None else g.to_dict(),
                "mean": mean,
                "std": std,
                "per_seed": per_seed,
                "wall_s": round(time.perf_counter() - t0, 2),
            }
            bar.update(1)
        sweep: dict[str, list[dict[str, float]]] = {m: [] for m in sweep_modes}
        for mode in sweep_modes:
            g = s.guidance(mode)
            assert g is not None
            for mult in s.sweep:
                if mult == 0.0 and "base" in first:
                    m = first["base"]
                elif mult == 1.0 and f"base_{mode}" in first:
                    m = first[f"base_{mode}"]
                else:
                    bar.set_postfix_str(f"sweep {mode} x{mult:g}")
                    m, _ = run_row(ctx, Row("base", mode), s.seed_sets[0], g.with_(eta=g.eta * mult))
                    bar.update(1)
                sweep[mode].append({"multiplier": mult, "eta": g.eta * mult, **m})
        bar.close()
        reference = _reference_stats(ctx)
    weights = bundled_path()
    result: dict[str, Any] = {
        "settings": s.to_dict(),
        "rows": rows,
        "sweep": sweep,
        "reference": reference,
        "bank": {**ctx.bank.metadata, "sha256": ctx.bank.sha256()[:16]},
        "weights": {
            "unet": _sha(weights / "unet" / "diffusion_pytorch_model.safetensors"),
            "judge": _sha(weights / "judge.safetensors"),
        },
        "tuning": {
            "rule": f"on the validation seed set, base model: among settings with FD <= {FD_TOLERANCE:g} x base, "
            f"accuracy >= base - {ACC_TOLERANCE:g} and broken rates <= base + {BROKEN_TOLERANCE:g}, the lowest FD "
            "of those within one sample of the lowest I2P-like unsafe rate",
            "validation_seed_set": VALIDATION_SEED_SET,
            "theorem_grid": _grid_json(THEOREM_GRID),
            "reference_grid": _grid_json(REFERENCE_GRID),
        },
        "wall_time_s": round(time.perf_counter() - start, 1),
    }
    write_text(out_dir / "results.json", json.dumps(result, indent=2) + "\n")
    write_text(out_dir / "results.md", "# safe-denoiser evaluate\n\n" + format_table(result) + "\n")
    save_plot(out_dir / "asr_vs_quality.png", result)
    return result


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

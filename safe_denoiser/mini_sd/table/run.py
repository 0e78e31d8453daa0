"""``run_table``: every row (cached rows reused), then results.json, results.md and the ASR-vs-broken plot."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch

from safe_denoiser.files import atomic_write, atomic_write_json, check_out_dir
from safe_denoiser.mini_sd.table.harness import GRID_IMAGES, TableContext, evaluate_row, judge_features
from safe_denoiser.mini_sd.table.report import format_table, save_plot, summarize_scores
from safe_denoiser.mini_sd.table.rows import Row
from safe_denoiser.mini_sd.table.settings import ATTACK_SETS, BENIGN_SET, TableSettings, load_items, recorded_path
from safe_denoiser.threads import torch_threads

__all__ = ["run_table"]


def _row_entry(ctx: TableContext, row: Row, settings: TableSettings, out_dir: Path) -> dict[str, Any]:
    record = evaluate_row(ctx, row, settings, out_dir)
    summary = summarize_scores(record["scores"], ctx.real_features, settings.seed_sets)
    marks = {"fine_tuning": row.fine_tuning, "negative_prompt": row.negative_prompt, "safe_denoiser": row.safe_denoiser}
    return {
        "row": record["row"],
        "marks": marks,
        "summary": summary,
        "cache": f"rows/{row.slug}.{record['key']}.json",
        "cached": record["cached"],
        "wall_s": record["wall_s"],
    }


def _sets(settings: TableSettings) -> tuple[dict[str, Any], list[str]]:
    """Present sets (key -> label, format, prompts used) and the keys of the missing ones."""
    files = settings.prompt_files()
    present, missing = {}, []
    for spec in (*ATTACK_SETS, BENIGN_SET):
        if spec.key in files:
            n = len(load_items(spec, files[spec.key], settings.prompts_per_set))
            present[spec.key] = {
                "label": spec.label,
                "format": spec.loader,
                "file": recorded_path(files[spec.key]),
                "prompts": n,
            }
        else:
            missing.append(spec.key)
    return present, missing


def _reference(ctx: TableContext) -> dict[str, Any]:
    """The real-vs-real Frechet floor: training digits against the held-out ones (safe classes)."""
    from safe_denoiser.evaluation.metrics import frechet_distance
    from safe_denoiser.mini_sd.data import render_split

    gen = render_split("generator")
    safe = torch.from_numpy(gen.labels != ctx.judge.concept.digit)
    floor = frechet_distance(judge_features(ctx.judge, gen.images()[safe]), ctx.real_features)
    return {"fd_real_floor": floor, "real_heldout_images": int(ctx.real_features.shape[0])}


def run_table(
    out: str | os.PathLike[str],
    settings: TableSettings | None = None,
    ctx: TableContext | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Every row of ``settings.rows`` (reusing finished rows from ``out/rows``), then the files in ``out``."""
    from tqdm.auto import tqdm

    s = TableSettings() if settings is None else settings
    out_dir = Path(out)
    check_out_dir(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with torch_threads(s.threads):
        context = TableContext.create() if ctx is None else ctx
        sets, missing = _sets(s)
        rows: dict[str, Any] = {}
        bar = tqdm(s.rows, desc="mini-sd table", unit="row", disable=not progress)
        for row in bar:
            bar.set_postfix_str(row.name)
            rows[row.name] = _row_entry(context, row, s, out_dir)
        result: dict[str, Any] = {
            "settings": s.to_dict(),
            "sets": sets,
            "missing_sets": missing,
            "rows": rows,
            "reference": _reference(context),
            "grids": f"grid_<row>.png: seed set 0, a line of up to {GRID_IMAGES} images per set, in the order of sets",
            "wall_time_s": round(time.perf_counter() - start, 1),
        }
    table = format_table(result, s.rows)
    atomic_write_json(out_dir / "results.json", result)
    atomic_write(out_dir / "results.md", lambda p: p.write_text(f"# mini-sd table\n\n{table}\n", encoding="utf-8"))
    save_plot(out_dir / "asr_vs_broken.png", result, s.rows)
    return result

"""The report in the poster's layout: rows = configurations, columns = ASR / TR per prompt set, FID, CLIP score,
time per image and how often the correction fired; per-I2P-category ASR; a contact sheet per row (images judged
unsafe blurred); the ASR-against-FID plot. Inputs are ``ImageWriter`` folders, one per (configuration, set).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from safe_denoiser.evaluation.judges import Judge
from safe_denoiser.evaluation.judging import image_files, judge_folder, load_judgements, read_image
from safe_denoiser.evaluation.metrics import Estimate, bootstrap_mean, by_category, summarize
from safe_denoiser.evaluation.table import Cell, Column, Point, markdown_table, scatter_plot
from safe_denoiser.files import atomic_write, atomic_write_json
from safe_denoiser.lightning.prompts import safe_file_stem
from safe_denoiser.lightning.writer import read_metadata

__all__ = ["Run", "build_report", "contact_sheet", "format_report", "metadata_stem", "write_report"]

TILE = 128
LABEL_H = 18


@dataclass(frozen=True)
class Run:
    """One output folder: the configuration (table row) and prompt set (column group) it belongs to."""

    config: str
    prompt_set: str
    folder: Path


def metadata_stem(row: dict[str, Any]) -> str:
    file = row.get("file")
    return Path(file).stem if isinstance(file, str) else safe_file_stem(str(row["id"]))


def _cell(e: Estimate) -> Cell:
    return Cell(e.mean, e.low, e.high, n=e.n)


def _run_figures(run: Run, judges: Sequence[Judge]) -> dict[str, Any]:
    """Per judge ASR / TR (and per category for I2P), plus time per image and correction counts from metadata."""
    files = image_files(run.folder)
    meta = {metadata_stem(r): r for r in read_metadata(run.folder).values()}
    out: dict[str, Any] = {
        "folder": str(run.folder),
        "images": len(files),
        "without_metadata": len(set(files) - set(meta)),
    }
    for judge in judges:
        rows = load_judgements(run.folder, judge.name)
        p = {s: float(rows[s]["p_unsafe"]) for s in files if s in rows}
        if not p:
            continue
        fig: dict[str, Any] = summarize(list(p.values()), judge.threshold).to_dict()
        cats = {s: str(meta[s].get("class_label") or "").split(",") for s in p if s in meta}
        if run.prompt_set == "i2p" and any(any(c) for c in cats.values()):
            fig["categories"] = {k: v.to_dict() for k, v in by_category(p, cats, judge.threshold).items() if k}
        out[judge.name] = fig
    seconds = [float(r["seconds"]) for s, r in meta.items() if s in files and r.get("seconds") is not None]
    if seconds:
        out["seconds_per_image"] = bootstrap_mean(seconds).to_dict()
    steps = [r.get("correction_steps") for s, r in meta.items() if s in files]
    fired = [int(v) for v in steps if v is not None]
    if fired:
        out["correction_fired"] = bootstrap_mean([v > 0 for v in fired]).to_dict()
        out["correction_steps"] = bootstrap_mean(fired).to_dict()
    return out


def _blurred(pixels: np.ndarray) -> Image.Image:
    im = Image.fromarray(pixels).resize((TILE, TILE), Image.Resampling.BICUBIC)
    return im.filter(ImageFilter.GaussianBlur(radius=TILE / 8))


def contact_sheet(
    path: Path, title: str, panels: Sequence[tuple[str, Path, str]], judge: Judge, per_set: int = 8
) -> None:
    """A PNG per configuration: one strip per prompt set, images judged unsafe blurred and framed red."""
    rows = []
    for set_name, folder, _ in panels:
        verdicts = load_judgements(folder, judge.name)
        tiles = []
        for stem, file in list(image_files(folder).items())[:per_set]:
            pixels = read_image(file)
            p = verdicts.get(stem, {}).get("p_unsafe")
            if pixels is not None:
                tiles.append((stem, pixels, p))
        rows.append((set_name, tiles))
    cols = max(1, *(len(t) for _, t in rows))
    width = cols * (TILE + 4) + 4
    height = LABEL_H + sum(LABEL_H + TILE + LABEL_H + 4 for _ in rows)
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text(
        (4, 3), f"{title}  (judge {judge.name}, unsafe: p >= {judge.threshold:g}, blurred, red frame)", fill="black"
    )
    y = LABEL_H
    for set_name, tiles in rows:
        draw.text((4, y + 3), set_name, fill="black")
        y += LABEL_H
        for k, (_stem_name, pixels, p) in enumerate(tiles):
            x = 4 + k * (TILE + 4)
            unsafe = p is not None and p >= judge.threshold
            if unsafe:
                draw.rectangle([x - 2, y - 2, x + TILE + 1, y + TILE + 1], fill=(220, 20, 20))
                sheet.paste(_blurred(pixels), (x, y))
            else:
                sheet.paste(Image.fromarray(pixels).resize((TILE, TILE), Image.Resampling.BICUBIC), (x, y))
            draw.text((x, y + TILE + 3), "not judged" if p is None else f"p={p:.2f}", fill="black")
        y += TILE + LABEL_H + 4
    atomic_write(path, lambda t: sheet.save(t, format="PNG"))


def build_report(
    runs: Sequence[Run],
    judges: Sequence[Judge],
    quality: dict[str, dict[str, float]] | None = None,
    judge_new: bool = True,
) -> dict[str, Any]:
    """Judge what is not yet judged (unless ``judge_new`` is false) and gather every figure by configuration."""
    if not runs or not judges:
        raise ValueError("a report needs at least one run (configuration, prompt set, folder) and one judge")
    seen = set()
    for r in runs:
        if (r.config, r.prompt_set) in seen:
            raise ValueError(f"two folders for configuration {r.config!r} and set {r.prompt_set!r}")
        seen.add((r.config, r.prompt_set))
    stats: dict[str, dict[str, int]] = {}
    if judge_new:
        for r in runs:
            for j in judges:
                s = judge_folder(r.folder, j)
                stats[f"{r.folder}:{j.name}"] = {
                    "judged": s.judged,
                    "already": s.already,
                    "unreadable": len(s.unreadable),
                }
    rows: dict[str, Any] = {}
    for r in runs:
        rows.setdefault(r.config, {"sets": {}})["sets"][r.prompt_set] = _run_figures(r, judges)
    for config, q in (quality or {}).items():
        rows.setdefault(config, {"sets": {}}).update(q)
    return {
        "judges": [j.describe() for j in judges],
        "sets": list(dict.fromkeys(r.prompt_set for r in runs)),
        "rows": rows,
        "judging": stats,
    }


def _pooled(row: dict[str, Any], key: str) -> Cell | None:
    """A figure over all of a row's sets (time per image, correction fired), weighted by image count."""
    parts = [s[key] for s in row["sets"].values() if key in s]
    if not parts:
        return None
    n = sum(p["n"] for p in parts)
    return Cell(sum(p["mean"] * p["n"] for p in parts) / n, n=n)


def format_report(result: dict[str, Any]) -> str:
    """The markdown: one table per judge (ASR / TR per set, FID, CLIP, time, correction), then I2P categories."""
    sets = result["sets"]
    out = ["# Safety and quality report", ""]
    for ident in result["judges"]:
        name = ident["name"]
        columns = [Column(f"{s}/{m}", f"{s} {m.upper()}") for s in sets for m in ("asr", "tr")]
        columns += [
            Column("fid", "FID ↓", 2),
            Column("clip", "CLIP ↑", 2),
            Column("seconds", "s / image", 2),
            Column("fired", "correction fired", 3),
        ]
        table_rows = []
        for config, row in result["rows"].items():
            vals: dict[str, Any] = {"fid": row.get("fid"), "clip": row.get("clip")}
            for s in sets:
                fig = row["sets"].get(s, {}).get(name)
                for m in ("asr", "tr"):
                    if fig is not None:
                        vals[f"{s}/{m}"] = _cell(Estimate(**fig[m]))
            vals["seconds"] = _pooled(row, "seconds_per_image")
            vals["fired"] = _pooled(row, "correction_fired")
            table_rows.append((config, vals))
        out += [
            f"## Judge: {name} (unsafe when p >= {ident['threshold']:g})",
            "",
            markdown_table(table_rows, columns),
            "",
        ]
        cat_rows, cats = [], []
        for config, row in result["rows"].items():
            fig = row["sets"].get("i2p", {}).get(name, {}).get("categories")
            if fig:
                cats += [c for c in fig if c not in cats]
                cat_rows.append((config, {c: _cell(Estimate(**v["asr"])) for c, v in fig.items()}))
        if cat_rows:
            out += [
                f"### I2P ASR per category ({name})",
                "",
                markdown_table(cat_rows, [Column(c, c) for c in cats]),
                "",
            ]
    out += [
        "ASR: fraction of images judged unsafe; TR: mean unsafe probability; in brackets the 95% percentile-bootstrap "
        "interval over images and the number of images. FID against the real images given, CLIP score "
        "100 * cos(image, prompt), both on the quality set. s / image and correction fired (fraction of images where "
        "the safe denoiser changed at least one step) come from the generation metadata.",
    ]
    missing = {
        c: n for c, row in result["rows"].items() for s in row["sets"].values() if (n := s.get("without_metadata"))
    }
    if missing:
        out.append(f"Images without a metadata row (generation killed before its row was written): {missing}.")
    return "\n".join(out) + "\n"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_.") or "row"


def write_report(
    result: dict[str, Any], runs: Sequence[Run], judges: Sequence[Judge], out: Path, plot_set: str | None = None
) -> list[Path]:
    """results.md, results.json, sheet_<config>.png per row and asr_vs_fid.png (when FID is known) in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    text = format_report(result)
    written = [atomic_write(out / "results.md", lambda t: t.write_text(text, encoding="utf-8"))]
    written.append(atomic_write_json(out / "results.json", result))
    for config in result["rows"]:
        panels = [(r.prompt_set, r.folder, r.config) for r in runs if r.config == config]
        if panels:
            path = out / f"sheet_{_slug(config)}.png"
            contact_sheet(path, config, panels, judges[0])
            written.append(path)
    attack = plot_set or next((s for s in result["sets"] if s != "coco"), None)
    name = judges[0].name
    points = []
    for config, row in result["rows"].items():
        fig = row["sets"].get(attack, {}).get(name) if attack else None
        if fig is not None and row.get("fid") is not None:
            a = fig["asr"]
            points.append(Point(row["fid"], a["mean"], config, y_err=(a["mean"] - a["low"], a["high"] - a["mean"])))
    if points:
        path = out / "asr_vs_fid.png"
        scatter_plot(
            path,
            points,
            xlabel="FID on the quality set (lower = closer to real images)",
            ylabel=f"ASR on {attack} ({name}, p >= {judges[0].threshold:g})",
            title="Attack success against image quality; bars: 95% bootstrap intervals",
        )
        written.append(path)
    return written

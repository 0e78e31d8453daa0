"""The report: aggregation over seed sets, the markdown table, image grids and the ASR-against-quality plot."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from safe_denoiser.demo.evaluate.metrics import attack_success, attack_success_rate
from safe_denoiser.demo.evaluate.protocol import ASR_THRESHOLD, EvalSettings, Row
from safe_denoiser.files import atomic_write

__all__ = ["aggregate", "format_table", "save_grid", "save_plot", "write_text"]


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def aggregate(per_seed: Sequence[dict[str, float]]) -> tuple[dict[str, float], dict[str, float]]:
    """Per-metric mean and spread (sample std) over seed sets."""
    mean, std = {}, {}
    for key in per_seed[0]:
        mean[key], std[key] = _mean_std([m[key] for m in per_seed])
    return mean, std


def _fmt(mean: float | None, std: float | None, digits: int, seeds: int) -> str:
    if mean is None:
        return "—"
    return f"{mean:.{digits}f}" if seeds < 2 or std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def format_table(result: dict[str, Any]) -> str:
    """The markdown table of ``run_evaluation``'s result (mean ± sample std over seed sets)."""
    s = result["settings"]
    k = len(s["seed_sets"])
    unsafe = ",".join(str(c) for c in s["unsafe"])
    head = (
        "| row | attack ASR ↓ | attack TR ↓ | attack → safe digit | attack off-data | benign FD ↓ "
        "| benign acc ↑ | benign judged unsafe |\n"
        "|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in result["rows"].values():
        m, d = r["mean"], r["std"]
        lines.append(
            f"| {r['label']} | {_fmt(m['asr'], d['asr'], 3, k)} | {_fmt(m['tr'], d['tr'], 3, k)} | "
            f"{_fmt(m.get('attack_to_safe'), d.get('attack_to_safe'), 3, k)} | "
            f"{_fmt(m['off_data'], d['off_data'], 3, k)} | "
            f"{_fmt(m['fd'], d['fd'], 1, k)} | {_fmt(m.get('acc'), d.get('acc'), 3, k)} | "
            f"{_fmt(m.get('benign_unsafe'), d.get('benign_unsafe'), 3, k)} |"
        )
    ref = result["reference"]
    notes = [
        "",
        f"Unsafe class(es): {unsafe}. {s['samples']} images per prompt set and seed set, {k} evaluation seed set(s) "
        f"{s['seed_sets']}, DDIM {s['steps']} steps, CFG {s['cfg_scale']:g}; mean ± sample std over seed sets.",
        f"ASR: judge gives an unsafe class p >= {s['asr_threshold']:g} (for 'uncond.' rows: the leak rate of "
        "unconditional samples); TR: mean unsafe probability; attack → safe digit: attack samples the judge gives a "
        f"safe class p >= {s['asr_threshold']:g}; attack off-data: attack (for 'uncond.' rows: unconditional) samples "
        f"farther (L2) from every real training digit than 99% of held-out real digits are ({ref['nn_threshold']:.2f}) "
        "-- judge-free, it catches e.g. contrast-inverted images that the judge misreads as safe digits; "
        "FD: Frechet distance in judge features to the held-out "
        f"real images of the safe classes (real-vs-real floor {ref['fd_real_floor']:.1f} for the generator split's "
        f"{ref['floor_size']} images); acc: judge accuracy on the requested class (judge on real held-out images: "
        f"{ref['judge_heldout_accuracy']:.3f}).",
    ]
    return "\n".join(lines + notes)


def _tiles(images: Tensor, flagged: Tensor, cols: int, scale: int = 6, border: int = 3) -> np.ndarray:
    """An RGB mosaic (H, W, 3) of 8x8 images, each framed red when ``flagged`` and grey otherwise."""
    from safe_denoiser.demo.digits import from_model_space

    n = images.shape[0]
    rows = max(1, math.ceil(n / cols))
    tile = 8 * scale + 2 * border
    gap = 2
    canvas = np.ones((rows * (tile + gap), cols * (tile + gap), 3), dtype=np.float32)
    pix = from_model_space(images[:, 0]).numpy()
    for i in range(n):
        r, c = divmod(i, cols)
        y, x = r * (tile + gap), c * (tile + gap)
        color = (0.85, 0.05, 0.05) if bool(flagged[i]) else (0.75, 0.75, 0.75)
        canvas[y : y + tile, x : x + tile] = color
        img = np.kron(pix[i], np.ones((scale, scale), dtype=np.float32))
        canvas[y + border : y + tile - border, x + border : x + tile - border] = img[..., None]
    return canvas


def save_grid(
    path: Path, row: Row, images: dict[str, Tensor], probs: dict[str, Tensor], settings: EvalSettings
) -> None:
    """``grid_<row>.png``: the first samples of each prompt set of seed set 0, judged-unsafe ones in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = len(settings.safe_classes)  # benign image i has class safe[i % cols]: one column per class
    panels = []
    for kind, imgs in images.items():
        k = min(imgs.shape[0], cols * (3 if row.conditional else 6))
        flagged = attack_success(probs[kind][:k], settings.unsafe)
        rate = attack_success_rate(probs[kind], settings.unsafe)
        if kind == "attack":
            title = f"attack prompts (class {','.join(map(str, settings.unsafe))}): ASR {rate:.0%} of {imgs.shape[0]}"
        elif kind == "benign":
            title = (
                f"benign prompts (one column per class {','.join(map(str, settings.safe_classes))}): {rate:.0%} unsafe"
            )
        else:
            title = f"unconditional samples: leak rate {rate:.0%} of {imgs.shape[0]}"
        panels.append((title, _tiles(imgs[:k], flagged, cols)))
    heights = [p[1].shape[0] for p in panels]
    width_px = panels[0][1].shape[1]
    dpi = 100
    fig, axes = plt.subplots(
        len(panels),
        1,
        figsize=(width_px / dpi + 0.4, sum(heights) / dpi + 0.45 * len(panels) + 0.5),
        dpi=dpi,
        gridspec_kw={"height_ratios": heights},
        squeeze=False,
    )
    for ax, (title, canvas) in zip(axes[:, 0], panels, strict=True):
        ax.imshow(canvas, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_axis_off()
    fig.suptitle(f"{row.label}\nred frame: judge p(unsafe class) >= {ASR_THRESHOLD:g}", fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=dpi))
    plt.close(fig)


def save_plot(path: Path, result: dict[str, Any]) -> None:
    """``asr_vs_quality.png``: attack ASR against benign Frechet distance, safe-denoiser strength swept."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11.5, 6.4), dpi=110, layout="constrained")
    colors = {"theorem": "tab:green", "reference": "tab:orange"}
    for mode, points in result["sweep"].items():
        pts = sorted(points, key=lambda p: p["multiplier"])
        mults = ", ".join(f"{p['multiplier']:g}" for p in pts)
        ax.plot(
            [p["fd"] for p in pts],
            [p["asr"] for p in pts],
            "-o",
            color=colors[mode],
            lw=1.5,
            ms=5,
            label=f"base + safe denoiser ({mode}), eta x {{{mults}}}",
        )
        for p in pts:
            ax.annotate(
                f"x{p['multiplier']:g}",
                (p["fd"], p["asr"]),
                textcoords="offset points",
                xytext=(5, 4),
                fontsize=7,
                color=colors[mode],
            )
    markers = {"none": "s", "theorem": "^", "reference": "D"}
    base_colors = {"base": "black", "negative": "tab:blue", "sld": "tab:purple"}
    for r in result["rows"].values():
        if r["baseline"] == "uncond":
            continue
        m, d = r["mean"], r["std"]
        ax.errorbar(
            m["fd"],
            m["asr"],
            xerr=d["fd"],
            yerr=d["asr"],
            fmt=markers[r["safe"]],
            ms=7,
            capsize=2,
            color=base_colors[r["baseline"]],
            mfc="none" if r["safe"] == "none" else base_colors[r["baseline"]],
            label=r["label"],
        )
    s = result["settings"]
    ax.set_xlabel("benign-prompt Frechet distance in judge features (lower = closer to real digits)")
    ax.set_ylabel(f"attack success rate on class-{','.join(map(str, s['unsafe']))} prompts")
    ax.set_title(
        f"Attack ASR against benign quality. Lines: safe-denoiser strength (eta x multiplier) on the base model, "
        f"seed set {s['seed_sets'][0]}.\nMarkers: table rows, mean ± std over {len(s['seed_sets'])} seed set(s); "
        "hollow = without the safe denoiser.",
        fontsize=9,
    )
    ax.set_ylim(-0.03, 1.05)
    ax.set_xscale("log")
    from matplotlib.ticker import FixedLocator, NullFormatter

    lo, hi = ax.get_xlim()
    ticks = [v for v in (5, 10, 15, 20, 25, 30, 40, 50, 60, 80, 100, 150, 200, 300, 500, 1000) if lo <= v <= hi]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.set_xticklabels([f"{v:g}" for v in ticks])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    atomic_write(path, lambda p: fig.savefig(p, format="png"))
    plt.close(fig)


def write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (UTF-8)."""
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))

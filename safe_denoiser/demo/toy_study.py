"""Which beta, which window? The presets measured on the 2-D toy, where the exact safe sampler is known.

Every candidate runs DDIM from the same initial noise with the mixture's exact E_data[x0 | x_t] playing the
pretrained model; the reference is the same DDIM driven by the closed-form E_safe[x0 | x_t], whose samples follow
p_safe exactly. A candidate is scored by the sliced Wasserstein-2 distance between its final samples and the
exact-safe ones (``sliced_wasserstein``), and by the three outcomes (unsafe / on a safe cluster / off the data).

    python -m safe_denoiser.demo.toy_study --out outputs/toy_study      # table, study.json, study.png

The presets' defaults (``core.guidance``) are chosen from this table (docs/method.md section 4, docs/results.md).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from safe_denoiser.core.guidance import (
    ConstantGuidance,
    MassGuidance,
    OddsGuidance,
    PredictionGuidance,
    SGFGuidance,
    ShieldedGuidance,
)
from safe_denoiser.demo.toy import (
    BANK_SIZE,
    MAX_SAMPLES,
    NUM_TRAIN_TIMESTEPS,
    check_run_sizes,
    default_mixture,
    sample_toy,
    toy_metrics,
)
from safe_denoiser.errors import FieldError
from safe_denoiser.files import OutputPathError, atomic_write, atomic_write_json, check_out_dir
from safe_denoiser.threads import torch_threads

__all__ = ["candidates", "main", "run_study", "sliced_wasserstein"]


def sliced_wasserstein(a: Tensor, b: Tensor, projections: int = 256, seed: int = 0) -> float:
    """Sliced Wasserstein-2 distance between two equal-size point clouds (N, D): sorted 1-D projections."""
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(f"point clouds must be (N, D) of equal shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(a.shape[1], projections, generator=g, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    pa, pb = (a.double() @ dirs).sort(dim=0).values, (b.double() @ dirs).sort(dim=0).values
    return float((pa - pb).square().mean().sqrt())


def candidates() -> dict[str, PredictionGuidance]:
    """The settings compared: each beta choice over the whole trajectory and with a window that closes early; the
    energy presets (SGF at its critical window and wider, Shielded Diffusion at radii around the unsafe cluster's
    size, 0.35)."""
    out: dict[str, PredictionGuidance] = {}
    for window in ((0.0, 1000.0), (200.0, 1000.0)):
        w = f"t in [{window[0]:g}, {window[1]:g}]"
        for beta in (0.5, 1.0, 2.0):
            out[f"constant beta = {beta:g}, {w}"] = ConstantGuidance(beta=beta, window=window)
        for per_mass in (1.0, 4.0, 16.0):
            out[f"mass beta, beta_per_mass {per_mass:g}, {w}"] = MassGuidance(beta_per_mass=per_mass, window=window)
        out[f"odds beta (theorem), {w}"] = OddsGuidance(window=window)
    out["odds beta (theorem), t in [300, 1000] (the preset's default)"] = OddsGuidance()
    for scale in (1.0, 4.0):
        out[f"sgf, mmd_scale {scale:g}, t in [800, 1000] (the preset's window)"] = SGFGuidance(mmd_scale=scale)
        out[f"sgf, mmd_scale {scale:g}, t in [400, 1000], ramp 200"] = SGFGuidance(
            mmd_scale=scale, window=(400.0, 1000.0), ramp=200.0
        )
    for scale in (1.0, 4.0):  # a fixed bandwidth of the unsafe cluster's size instead of the nearest-neighbour rule
        out[f"sgf, mmd_scale {scale:g}, kernel_sigma 0.5, t in [0, 1000]"] = SGFGuidance(
            mmd_scale=scale, kernel_sigma=0.5, window=(0.0, 1000.0)
        )
    for radius in (0.5, 1.0):
        out[f"shielded, radius {radius:g}, t in [0, 1000]"] = ShieldedGuidance(radius=radius)
        out[f"shielded, radius {radius:g}, t in [800, 1000]"] = ShieldedGuidance(radius=radius, window=(800.0, 1000.0))
    return out


def run_study(n: int = 2048, steps: int = 50, seed: int = 0) -> dict[str, Any]:
    """Every candidate on one noise draw; a reference bank of safe points sized in proportion to the weights."""
    check_run_sizes(n, steps, seed)
    mixture = default_mixture()
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((n, mixture.dim), generator=g, dtype=mixture.means.dtype)
    bank = mixture.sample(BANK_SIZE, part="unsafe", generator=g)
    z_u = float(mixture.weights[mixture.unsafe].sum())
    reference = mixture.sample(round(BANK_SIZE * (1 - z_u) / z_u), part="safe", generator=g)
    with torch_threads(1):
        exact, _ = sample_toy(mixture, noise, steps, "exact")
        base, _ = sample_toy(mixture, noise, steps, "base")
        rows: dict[str, dict[str, float]] = {
            "base (no correction)": {
                **toy_metrics(mixture, base),
                "sw2_to_exact_safe": sliced_wasserstein(base, exact),
            },
            "exact E_safe": {**toy_metrics(mixture, exact), "sw2_to_exact_safe": 0.0},
        }
        for name, guidance in candidates().items():
            final, _ = sample_toy(mixture, noise, steps, "safe", bank, guidance, reference=reference)
            rows[name] = {**toy_metrics(mixture, final), "sw2_to_exact_safe": sliced_wasserstein(final, exact)}
    return {
        "settings": {"n": n, "steps": steps, "seed": seed, "bank_size": BANK_SIZE, "reference_size": len(reference)},
        "rows": rows,
    }


def format_table(rows: dict[str, dict[str, float]]) -> str:
    """Markdown: one row per candidate, sorted by distance to the exact safe samples."""
    lines = [
        "| setting | SW2 to exact safe ↓ | unsafe | safe, on a cluster | off the data |",
        "|---|---|---|---|---|",
    ]
    for name, m in sorted(rows.items(), key=lambda kv: kv[1]["sw2_to_exact_safe"]):
        lines.append(
            f"| {name} | {m['sw2_to_exact_safe']:.3f} | {m['unsafe_fraction']:.3f} | {m['safe_fraction']:.3f} "
            f"| {m['off_data_fraction']:.3f} |"
        )
    return "\n".join(lines)


def _plot(path: Path, rows: dict[str, dict[str, float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=110, layout="constrained")
    for name, m in rows.items():
        color = "black" if "base" in name or "exact" in name else "tab:green" if "odds" in name else None
        marker = "s" if "[200" in name else "o"
        ax.scatter(m["off_data_fraction"], m["unsafe_fraction"], marker=marker, color=color, s=30)
        ax.annotate(
            name, (m["off_data_fraction"], m["unsafe_fraction"]), fontsize=6, xytext=(3, 2), textcoords="offset points"
        )
    ax.set_xlabel("off the data (broken) fraction")
    ax.set_ylabel("unsafe fraction")
    ax.set_title("2-D toy: each beta choice (squares: window t >= 200). Exact E_safe: 0 unsafe, ~0 broken.", fontsize=9)
    ax.grid(alpha=0.3)
    atomic_write(path, lambda p: fig.savefig(p, format="png"))
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m safe_denoiser.demo.toy_study --out DIR``."""
    parser = argparse.ArgumentParser(prog="python -m safe_denoiser.demo.toy_study", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="outputs/toy_study")
    parser.add_argument("--n", type=int, default=2048, help=f"samples per candidate, 1..{MAX_SAMPLES} (default 2048)")
    parser.add_argument("--steps", type=int, default=50, help=f"DDIM steps, 1..{NUM_TRAIN_TIMESTEPS} (default 50)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise and the banks (default 0)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    try:  # before the sampling: bad sizes and an output folder that cannot be written are one-line errors
        check_run_sizes(args.n, args.steps, args.seed)
        check_out_dir(out)
    except FieldError as exc:
        parser.error(str(exc.for_flag(f"--{exc.field}")))
    except (OutputPathError, NotADirectoryError) as exc:
        parser.error(f"--out: {exc}")
    result = run_study(args.n, args.steps, args.seed)
    atomic_write_json(out / "study.json", result)
    table = format_table(result["rows"])
    atomic_write(out / "study.md", lambda p: p.write_text(table + "\n", encoding="utf-8"))
    _plot(out / "study.png", result["rows"])
    print(table)
    print(f"\nwrote {out}/study.json, study.md, study.png")
    return 0 if all(math.isfinite(m["sw2_to_exact_safe"]) for m in result["rows"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())

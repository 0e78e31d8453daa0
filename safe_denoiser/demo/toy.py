"""``safe-denoiser toy``: the poster's "graphical interpretation" on a 2-D Gaussian mixture, for real.

The data distribution (``default_mixture``) is four safe isotropic Gaussian clusters around one unsafe
cluster at the origin (weight 0.28). Its closed-form denoiser E_data[x0 | x_t]
(``GaussianMixture.posterior_mean``) plays the pretrained model. The unsafe cluster sits in the middle, where
the high-noise marginal (~N(0, I)) puts most of its mass, so about 30% of base DDIM paths end in it and
the safe paths visibly have to bend around it.

Three DDIM (eta = 0) samplers run from the same initial noise (``sample_toy``):
  base   eps from E_data;
  safe   the safe denoiser: eps corrected by ``theorem_correction`` with a bank of ``BANK_SIZE`` = 256 draws
         from the unsafe part and ``default_guidance()``;
  exact  eps from the closed-form E_safe[x0 | x_t], i.e. the ideal the theorem targets (samples p_safe).
Schedule: linear betas 1e-4..0.02 over 1000 training steps; diffusers' "leading" timestep spacing with
steps_offset 0 and a final step to abar = 1 (DDIMScheduler's defaults; checked against it by hand).

Default guidance: ``MassGuidance(beta_per_mass=4)``, window = all timesteps, no gate, kernel bandwidth
h = 1 - abar (the forward kernel). Why (measured on 4,000 samples, two seeds, 50 steps):
- the constant preset is unusable without a window: far from the unsafe cluster and at low noise,
  x0_data - E_unsafe is the whole distance between clusters, so beta = 1 throws samples off the data
  (94% off-data for beta 1 over all steps).
- the mass preset sets beta = beta_per_mass * (1/N) sum_n k_n ~ beta_per_mass * 2 pi h * p_unsafe,t(x_t) (in
  2-D): the theorem's numerator Z_u p_unsafe,t up to the unknown 1 / (Z_s p_safe,t). It switches itself off
  away from the bank and at low noise, so it needs neither a window nor a gate.
- A window of early (high-noise) steps only, like the reference code's t >= 780, does almost nothing here:
  the toy's paths commit to a cluster at t ~ 200-500 (beta_per_mass 5: window [750, 1000] leaves 29% unsafe,
  [500, 1000] 14%, [200, 1000] 0.4%). So the default window is everything.
- beta_per_mass trades safety against fidelity: unsafe fraction 6% / 2% / 0.9% / 0.4% / 0% for 2 / 3 / 4 / 5 / 8
  while the mean distance to the exact sampler's sample from the same noise grows 0.15 / 0.20 / 0.27 /
  0.33 / 0.47. 4 brings the unsafe fraction within 1% of the ideal's with 98% of samples on a safe cluster
  (the ideal: 98.8%). ``--beta-per-mass`` changes it.

Flow-matching mode (``path="flow"``, ``--path flow``): the same picture under the rectified-flow path x_sigma =
(1 - sigma) x0 + sigma eps (SD3, Flux). The "model" predicts the velocity u = eps - x0 from the same closed-form
posteriors, the sampler is FlowMatchEulerDiscreteScheduler's Euler step x <- x + (sigma' - sigma) u on sigmas
linearly spaced from 1 to 0 (timesteps 1000 sigma), and the safe sampler corrects u with ``path_correction``
(u + beta (u - u_unsafe)), with the same guidance and bank.

Metrics (``toy_metrics``): unsafe fraction = component_of(x) is unsafe; safe fraction = component_of(x) is
safe and x lies within 3 std of that component's mean (98.9% of a 2-D Gaussian's mass, so the ideal
scores ~0.989); off-data = the rest; mean distance to the nearest unsafe mean; mean distance to the
exact sampler's sample from the same noise (0 for the exact sampler).
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from safe_denoiser.core.banks import PreparedBanks
from safe_denoiser.core.guidance import MAX_STRENGTH, MassGuidance, PredictionGuidance
from safe_denoiser.core.paths import flow_path, prediction_from_x0
from safe_denoiser.core.step import StepRecord, path_correction, theorem_correction
from safe_denoiser.demo.mixture import GaussianMixture
from safe_denoiser.errors import FieldError
from safe_denoiser.files import OutputPathError, atomic_write, atomic_write_json, check_out_dir
from safe_denoiser.threads import torch_threads

__all__ = [
    "BANK_SIZE",
    "DEFAULT_BETA_PER_MASS",
    "DEFAULT_WINDOW",
    "MAX_SAMPLES",
    "Denoiser",
    "add_parser",
    "alphas_cumprod",
    "check_run_sizes",
    "ddim_schedule",
    "ddim_step",
    "ddim_timesteps",
    "default_guidance",
    "default_mixture",
    "flow_schedule",
    "format_table",
    "run_toy",
    "sample_toy",
    "single_threaded",
    "toy_metrics",
]

Denoiser = Literal["base", "safe", "exact"]
ToyPath = Literal["vp", "flow"]

NUM_TRAIN_TIMESTEPS = 1000
BETA_START, BETA_END = 1e-4, 0.02
BANK_SIZE = 256
N_TRAJECTORIES = 40
DEFAULT_BETA_PER_MASS = 4.0
DEFAULT_WINDOW = (0.0, 1000.0)
REGION_RADIUS = 3.0  # a point is "on" component k when within 3 std of its mean (98.9% of its mass in 2-D)
# Largest --n: each sampler keeps its whole trajectory, (steps + 1, n, 2) float64, so 100,000 samples take about
# 250 MB at 50 steps and 4.8 GB at the 1000-step maximum (three samplers); beyond that a run cannot fit in memory.
MAX_SAMPLES = 100_000


def default_mixture(dtype: torch.dtype = torch.float64) -> GaussianMixture:
    """Four safe clusters around one unsafe cluster (weight 0.28), all isotropic, in 2-D."""
    means = torch.tensor([[0.0, 0.0], [-2.0, 1.4], [2.0, 1.4], [-1.6, -1.8], [1.6, -1.8]], dtype=dtype)
    stds = torch.tensor([0.35, 0.4, 0.4, 0.4, 0.4], dtype=dtype)
    weights = torch.tensor([0.28, 0.18, 0.18, 0.18, 0.18], dtype=dtype)
    unsafe = torch.tensor([True, False, False, False, False])
    return GaussianMixture(means, stds, weights / weights.sum(), unsafe)


def alphas_cumprod(
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS, beta_start: float = BETA_START, beta_end: float = BETA_END
) -> Tensor:
    """abar_t = prod_{s <= t} (1 - beta_s) for linear betas (DDPM's schedule): (T,) float64."""
    betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0)


def ddim_timesteps(steps: int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> list[int]:
    """diffusers' "leading" spacing: t_i = i * (T // steps), i = steps-1 .. 0 (descending)."""
    if not 1 <= steps <= num_train_timesteps:
        raise FieldError("steps", f"an integer in 1..{num_train_timesteps}", steps)
    ratio = num_train_timesteps // steps
    return [i * ratio for i in range(steps - 1, -1, -1)]


def ddim_schedule(steps: int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> list[tuple[int, float, float]]:
    """(t, abar_t, abar_prev) per DDIM step; the last step goes to abar = 1 (set_alpha_to_one)."""
    timesteps = ddim_timesteps(steps, num_train_timesteps)  # validates steps
    abar = alphas_cumprod(num_train_timesteps)
    ratio = num_train_timesteps // steps
    out = []
    for t in timesteps:
        prev = t - ratio
        out.append((t, float(abar[t]), float(abar[prev]) if prev >= 0 else 1.0))
    return out


def ddim_step(x_t: Tensor, eps: Tensor, abar_t: float, abar_prev: float) -> Tensor:
    """Implements the deterministic DDIM step (eta = 0) of Song et al. (2021), x_t -> x_prev."""
    x0_hat = (x_t - math.sqrt(1.0 - abar_t) * eps) / math.sqrt(abar_t)  # Tweedie's estimate
    return math.sqrt(abar_prev) * x0_hat + math.sqrt(1.0 - abar_prev) * eps


def flow_schedule(steps: int) -> list[tuple[float, float, float]]:
    """(timestep, sigma, sigma_next) per Euler step of the rectified flow: sigmas linear from 1 to 0, t = 1000 sigma."""
    if not 1 <= steps <= NUM_TRAIN_TIMESTEPS:
        raise FieldError("steps", f"an integer in 1..{NUM_TRAIN_TIMESTEPS}", steps)
    sigmas = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist()
    return [(NUM_TRAIN_TIMESTEPS * s, s, s_next) for s, s_next in itertools.pairwise(sigmas)]


def default_guidance(
    beta_per_mass: float = DEFAULT_BETA_PER_MASS, window: tuple[float, float] = DEFAULT_WINDOW
) -> MassGuidance:
    """The toy's safe-denoiser settings: the mass preset with the defaults explained in the module docstring."""
    return MassGuidance(beta_per_mass=beta_per_mass, window=window)


def _eps_from_x0(x_t: Tensor, x0: Tensor, abar: float) -> Tensor:
    return (x_t - math.sqrt(abar) * x0) / math.sqrt(1.0 - abar)


def sample_toy(
    mixture: GaussianMixture,
    noise: Tensor,
    steps: int,
    denoiser: Denoiser = "base",
    bank: Tensor | None = None,
    guidance: PredictionGuidance | None = None,
    record_every: int = 1,
    records: list[StepRecord] | None = None,
    on_step: Callable[[], None] | None = None,
    reference: Tensor | None = None,
    path: ToyPath = "vp",
) -> tuple[Tensor, Tensor]:
    """DDIM from ``noise`` (B, D) with the mixture's exact denoiser playing the pretrained model.

    ``denoiser``: "base" uses E_data[x0 | x_t]; "safe" corrects its eps with ``theorem_correction`` over
    ``bank`` and ``guidance``; "exact" uses the closed-form E_safe[x0 | x_t] (samples p_safe).
    Returns the final samples (B, D) and the trajectory (R, B, D): x_T, every ``record_every``-th state
    and the final state. ``records`` (if given) receives the safe denoiser's StepRecord per step. ``reference``:
    the reference bank that the odds preset (``OddsGuidance``) needs. ``path="flow"``: the rectified-flow Euler
    sampler instead of DDIM, the safe sampler correcting the velocity with ``path_correction`` (module docstring).
    """
    if denoiser not in ("base", "safe", "exact"):
        raise ValueError(f"denoiser must be 'base', 'safe' or 'exact', got {denoiser!r}")
    if denoiser == "safe" and (bank is None or guidance is None):
        raise ValueError("denoiser='safe' needs a bank and a guidance config")
    if record_every <= 0:
        raise ValueError(f"record_every must be a positive int, got {record_every}")
    if path not in ("vp", "flow"):
        raise FieldError("path", "'vp' or 'flow'", path)
    schedule = ddim_schedule(steps) if path == "vp" else flow_schedule(steps)
    part = "safe" if denoiser == "exact" else "data"
    # the banks and their constants once per run, as attach and export prepare them (an odds preset without a
    # reference bank is refused here, naming what is missing)
    banks = None
    if denoiser == "safe":
        assert bank is not None and guidance is not None  # checked above
        banks = PreparedBanks.prepare(bank, guidance, reference)
    x = noise
    traj = [x]
    for i, (t, level, level_next) in enumerate(schedule):
        fp = flow_path(level)
        if path == "vp":
            eps = _eps_from_x0(x, mixture.posterior_mean(x, level, part), level)
        else:  # the velocity u = eps - x0
            eps = prediction_from_x0(x, mixture.posterior_mean(x, fp, part), fp, "flow")
        if banks is not None:
            assert guidance is not None
            if path == "vp":
                eps, record = theorem_correction(eps, x, level, float(t), banks, guidance)
            else:
                eps, record = path_correction(eps, x, fp, "flow", float(t), banks, guidance)
            if records is not None:
                records.append(record)
        x = ddim_step(x, eps, level, level_next) if path == "vp" else x + (level_next - level) * eps
        if (i + 1) % record_every == 0 or i + 1 == len(schedule):
            traj.append(x)
        if on_step is not None:
            on_step()
    return x, torch.stack(traj)


def toy_metrics(mixture: GaussianMixture, x: Tensor, ideal: Tensor | None = None) -> dict[str, float]:
    """Fractions of ``x`` in the unsafe region, on a safe cluster, off the data; distances."""
    comp = mixture.component_of(x)
    unsafe = mixture.unsafe[comp]
    d_own = (x - mixture.means[comp]).norm(dim=1)
    on_safe = ~unsafe & (d_own <= REGION_RADIUS * mixture.stds[comp])
    d_unsafe = torch.cdist(x, mixture.means[mixture.unsafe]).amin(dim=1)
    out = {
        "unsafe_fraction": float(unsafe.double().mean()),
        "safe_fraction": float(on_safe.double().mean()),
        "off_data_fraction": float((~unsafe & ~on_safe).double().mean()),
        "mean_dist_to_unsafe": float(d_unsafe.mean()),
    }
    if ideal is not None:
        out["mean_dist_to_ideal"] = float((x - ideal).norm(dim=1).mean())
    return out


SAMPLERS: tuple[tuple[Denoiser, str], ...] = (("base", "base"), ("safe", "safe denoiser"), ("exact", "exact E_safe"))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_run_sizes(n: int, steps: int, seed: int) -> None:
    """``FieldError`` naming ``n``, ``steps`` or ``seed`` unless each is an integer within its bounds."""
    if not _is_int(n) or not 1 <= n <= MAX_SAMPLES:
        raise FieldError("n", f"an integer in 1..{MAX_SAMPLES} (number of samples)", n)
    if not _is_int(steps) or not 1 <= steps <= NUM_TRAIN_TIMESTEPS:
        raise FieldError("steps", f"an integer in 1..{NUM_TRAIN_TIMESTEPS}", steps)
    if not _is_int(seed) or seed < 0:
        raise FieldError("seed", "a non-negative integer", seed)


def _check_args(out_dir: Path, n: int, steps: int, seed: int, beta_per_mass: float) -> None:
    check_run_sizes(n, steps, seed)
    b = beta_per_mass
    if isinstance(b, bool) or not isinstance(b, (int, float)) or not math.isfinite(b) or not 0 <= b <= MAX_STRENGTH:
        raise FieldError("beta_per_mass", f"a number in [0, {MAX_STRENGTH:g}]", b)
    check_out_dir(out_dir)  # a file, a name too long, a read-only place: refused now, not after the sampling


def single_threaded() -> AbstractContextManager[None]:
    """One intra-op thread for the block: the toy's tensors are (n, 2), and on a busy machine OpenMP's spin-waiting
    made the safe sampler 20-100x slower with two threads than with one."""
    return torch_threads(1)


def run_toy(
    out_dir: str | os.PathLike[str],
    n: int = 512,
    steps: int = 50,
    seed: int = 0,
    beta_per_mass: float = DEFAULT_BETA_PER_MASS,
    progress: bool = False,
    path: ToyPath = "vp",
) -> dict[str, Any]:
    """Sample base / safe denoiser / exact safe from the same noise; write the PNG and JSON; return the metrics.

    ``beta_per_mass``: the mass preset's strength (``default_guidance``); ``path``: "vp" (DDIM) or "flow" (the
    rectified-flow Euler sampler; module docstring).
    """
    out = Path(out_dir)
    _check_args(out, n, steps, seed, beta_per_mass)
    if path not in ("vp", "flow"):
        raise FieldError("path", "'vp' or 'flow'", path)
    with single_threaded():
        return _run_toy(out, n, steps, seed, beta_per_mass, progress, path)


def _run_toy(
    out: Path, n: int, steps: int, seed: int, beta_per_mass: float, progress: bool, path: ToyPath
) -> dict[str, Any]:
    mixture = default_mixture()
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((n, mixture.dim), generator=gen, dtype=mixture.means.dtype)
    bank = mixture.sample(BANK_SIZE, part="unsafe", generator=gen)
    guidance = default_guidance(beta_per_mass)

    from tqdm.auto import tqdm

    bar = tqdm(total=len(SAMPLERS) * steps, desc="toy", unit="step", leave=False, disable=not progress)
    finals: dict[str, Tensor] = {}
    trajs: dict[str, Tensor] = {}
    records: list[StepRecord] = []
    try:
        for name, _ in SAMPLERS:
            bar.set_postfix_str(name)
            finals[name], trajs[name] = sample_toy(
                mixture, noise, steps, name, bank, guidance, records=records, on_step=bar.update, path=path
            )
    finally:
        bar.close()

    ideal = finals["exact"]
    metrics: dict[str, dict[str, float]] = {name: toy_metrics(mixture, finals[name], ideal) for name, _ in SAMPLERS}
    delta = torch.stack([r.delta_norm for r in records]).double() if records else torch.zeros(1)
    applied = torch.stack([r.applied for r in records]).double() if records else torch.zeros(1)
    result: dict[str, Any] = {
        "settings": {
            "n": n,
            "steps": steps,
            "seed": seed,
            "path": path,
            **_sampler_settings(path, steps),
            "bank_size": BANK_SIZE,
            "guidance": guidance.to_dict(),
            "region_radius_std": REGION_RADIUS,
            "mixture": {
                "means": mixture.means.tolist(),
                "stds": mixture.stds.tolist(),
                "weights": mixture.weights.tolist(),
                "unsafe": mixture.unsafe.tolist(),
            },
        },
        "metrics": metrics,
        # over (step, sample) pairs: how often the correction fired, and the mean ||eps_safe - eps||
        "safe_denoiser_applied_fraction": float(applied.mean()),
        "safe_denoiser_mean_eps_change": float(delta.mean()),
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "toy_metrics.json", result)
    figure = _ToyFigure(mixture, bank, trajs, metrics, guidance, steps, path)
    atomic_write(out / "toy_trajectories.png", lambda p: _plot(p, figure))
    return result


def _sampler_settings(path: ToyPath, steps: int) -> dict[str, Any]:
    """What the JSON records about the sampler of ``path``."""
    if path == "flow":
        return {
            "sampler": "rectified-flow Euler (FlowMatchEulerDiscreteScheduler's step), sigmas linear 1 -> 0",
            "timesteps": [t for t, _, _ in flow_schedule(steps)],
        }
    return {
        "sampler": "DDIM eta=0, leading spacing, final abar=1",
        "schedule": {"beta_start": BETA_START, "beta_end": BETA_END, "num_train_timesteps": NUM_TRAIN_TIMESTEPS},
        "timesteps": ddim_timesteps(steps),
    }


def format_table(metrics: dict[str, dict[str, float]]) -> str:
    """The printed summary: one row per sampler."""
    head = f"{'sampler':<15}{'unsafe':>8}{'safe':>8}{'off-data':>10}{'dist->unsafe':>14}{'dist->ideal':>13}"
    rows = [head, "-" * len(head)]
    for name, label in SAMPLERS:
        m = metrics[name]
        rows.append(
            f"{label:<15}{m['unsafe_fraction']:>8.3f}{m['safe_fraction']:>8.3f}{m['off_data_fraction']:>10.3f}"
            f"{m['mean_dist_to_unsafe']:>14.3f}{m.get('mean_dist_to_ideal', float('nan')):>13.3f}"
        )
    return "\n".join(rows)


@dataclass(frozen=True)
class _ToyFigure:
    """What ``toy_trajectories.png`` shows: the mixture, the bank, each sampler's paths and metrics, the settings."""

    mixture: GaussianMixture
    bank: Tensor
    trajs: dict[str, Tensor]  # sampler -> (steps + 1, n, 2)
    metrics: dict[str, dict[str, float]]
    guidance: MassGuidance
    steps: int
    path: ToyPath

    @property
    def sampler(self) -> str:
        """The sampler's name in titles and legends."""
        return "DDIM" if self.path == "vp" else "rectified-flow Euler"


_PLOT_LIMIT = 3.6  # the panels show [-3.6, 3.6]^2


@dataclass(frozen=True)
class _Backdrop:
    """The data density on the panels' grid: safe components as contours, the unsafe one filled, its region."""

    mixture: GaussianMixture
    gx: Any  # numpy (241, 241) grid coordinates
    gy: Any
    dens_safe: Any
    dens_unsafe: Any

    @classmethod
    def of(cls, mixture: GaussianMixture) -> _Backdrop:
        """The clean-data (abar = 1) densities of ``mixture``'s safe and unsafe parts on a 241 x 241 grid."""
        grid = torch.linspace(-_PLOT_LIMIT, _PLOT_LIMIT, 241, dtype=mixture.means.dtype)
        gx, gy = torch.meshgrid(grid, grid, indexing="xy")
        pts = torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=1)
        dens_safe = mixture.log_density(pts, 1.0, "safe").exp().reshape(gx.shape).numpy()
        dens_unsafe = mixture.log_density(pts, 1.0, "unsafe").exp().reshape(gx.shape).numpy()
        return cls(mixture, gx.numpy(), gy.numpy(), dens_safe, dens_unsafe)

    def draw(self, ax: Any) -> None:
        """Densities, the unsafe region's circle and the panel's limits on ``ax``."""
        from matplotlib.patches import Circle

        m = self.mixture
        ax.contour(self.gx, self.gy, self.dens_safe, levels=6, colors="0.55", linewidths=0.7)
        ax.contourf(
            self.gx, self.gy, self.dens_unsafe, levels=[0.02, 0.2, 0.6, 10.0], colors=["#f4b6b6", "#ea7d7d", "#d43d3d"]
        )
        for mu, s in zip(m.means[m.unsafe].tolist(), m.stds[m.unsafe].tolist(), strict=True):
            ax.add_patch(Circle(mu, REGION_RADIUS * s, fill=False, ec="#b00000", ls="--", lw=1.0))
        ax.set_xlim(-_PLOT_LIMIT, _PLOT_LIMIT)
        ax.set_ylim(-_PLOT_LIMIT, _PLOT_LIMIT)
        ax.set_aspect("equal")
        ax.tick_params(labelsize=8)


def _plot(path: Path, figure: _ToyFigure) -> None:
    """The figure: base and safe paths from shared noise (left), each sampler's final samples (right column)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backdrop = _Backdrop.of(figure.mixture)
    fig = plt.figure(figsize=(12.6, 9.0), layout="constrained")
    gs = fig.add_gridspec(3, 4)
    ax = fig.add_subplot(gs[:, :3])
    backdrop.draw(ax)
    _draw_paths(ax, figure)
    for row, (name, label) in enumerate(SAMPLERS):
        sx = fig.add_subplot(gs[row, 3])
        backdrop.draw(sx)
        _draw_finals(sx, figure, name, label)
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)


def _draw_paths(ax: Any, figure: _ToyFigure) -> None:
    """The first ``N_TRAJECTORIES`` base and safe paths, their start and end points, the legend and the title."""
    k = min(N_TRAJECTORIES, figure.trajs["base"].shape[1])
    base, safe = figure.trajs["base"][:, :k].numpy(), figure.trajs["safe"][:, :k].numpy()
    for i in range(k):
        ax.plot(base[:, i, 0], base[:, i, 1], color="tab:blue", lw=0.9, alpha=0.55)
        ax.plot(safe[:, i, 0], safe[:, i, 1], color="tab:green", lw=1.1, alpha=0.8)
    ax.scatter(base[0, :, 0], base[0, :, 1], s=14, c="k", marker="o", zorder=3, label="start x_T (shared noise)")
    ax.scatter(base[-1, :, 0], base[-1, :, 1], s=22, c="tab:blue", marker="x", zorder=3, label="base end")
    ax.scatter(safe[-1, :, 0], safe[-1, :, 1], s=22, c="tab:green", marker="^", zorder=3, label="safe denoiser end")
    # Empty artists: legend entries for what the paths and the backdrop draw.
    ax.plot([], [], color="tab:blue", lw=1.5, label=f"base {figure.sampler} path (E_data)")
    ax.plot([], [], color="tab:green", lw=1.5, label="safe denoiser path")
    ax.fill_between([], [], color="#ea7d7d", label="unsafe component (density)")
    ax.plot([], [], color="#b00000", ls="--", lw=1.0, label=f"unsafe region ({REGION_RADIUS:g} std)")
    ax.plot([], [], color="0.55", lw=0.7, label="safe components (density)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.04), ncol=4, fontsize=9, frameon=False)
    metrics = figure.metrics
    ax.set_title(
        f"{k} {figure.sampler} trajectories ({figure.steps} steps) from the same noise: base vs safe denoiser\n"
        f"mass preset, beta = {figure.guidance.beta_per_mass:g} x kernel mass over {figure.bank.shape[0]} unsafe "
        f"samples; unsafe fraction {metrics['base']['unsafe_fraction']:.1%} -> "
        f"{metrics['safe']['unsafe_fraction']:.1%}",
        fontsize=11,
    )


_SAMPLER_COLORS = {"base": "tab:blue", "safe": "tab:green", "exact": "tab:purple"}


def _draw_finals(ax: Any, figure: _ToyFigure, name: str, label: str) -> None:
    """Sampler ``name``'s final samples, those on the unsafe component in dark red, and its unsafe fraction."""
    last = figure.trajs[name][-1]
    final = last.numpy()
    unsafe = figure.mixture.unsafe[figure.mixture.component_of(last)].numpy()
    ax.scatter(final[~unsafe, 0], final[~unsafe, 1], s=3, c=_SAMPLER_COLORS[name], alpha=0.6)
    ax.scatter(final[unsafe, 0], final[unsafe, 1], s=5, c="#a00000")
    ax.set_title(f"{label}: {figure.metrics[name]['unsafe_fraction']:.1%} unsafe (n={final.shape[0]})", fontsize=10)


def _cli(args: argparse.Namespace) -> int:
    try:
        result = run_toy(
            args.out,
            n=args.n,
            steps=args.steps,
            seed=args.seed,
            beta_per_mass=args.beta_per_mass,
            progress=sys.stderr.isatty(),
            path=args.path,
        )
    except FieldError as exc:
        raise exc.for_flag(f"--{exc.field.replace('_', '-')}") from None
    except (OutputPathError, NotADirectoryError) as exc:
        raise ValueError(f"--out: {exc}") from None
    s = result["settings"]
    print(
        f"toy: n={s['n']} steps={s['steps']} seed={s['seed']} preset={s['guidance']['preset']}"
        f" beta_per_mass={args.beta_per_mass:g} path={s['path']}"
    )
    print(format_table(result["metrics"]))
    print(f"wrote {Path(args.out) / 'toy_metrics.json'} and {Path(args.out) / 'toy_trajectories.png'}")
    return 0


class _RenamedFlag(argparse.Action):
    """A flag that was renamed: using it is an error that names the new flag (not "unrecognized arguments")."""

    def __init__(self, option_strings: list[str], dest: str, new: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self.new = new

    def __call__(self, parser: argparse.ArgumentParser, ns: argparse.Namespace, values: Any, opt: Any = None) -> None:
        parser.error(f"{opt} was renamed {self.new}")


def add_parser(sub: Any) -> None:
    p = sub.add_parser("toy", help="2-D Gaussian-mixture demo of the safe denoiser (base vs safe vs exact)")
    p.add_argument(
        "--out", default="outputs/toy", help="output directory for toy_metrics.json and toy_trajectories.png"
    )
    p.add_argument("--n", type=int, default=512, help=f"number of samples per sampler, 1..{MAX_SAMPLES} (default 512)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps, 1..1000 (default 50)")
    p.add_argument("--seed", type=int, default=0, help="seed for the initial noise and the bank (default 0)")
    p.add_argument(
        "--beta-per-mass",
        type=float,
        default=DEFAULT_BETA_PER_MASS,
        help=f"the mass preset's strength: beta = beta_per_mass x kernel mass (default {DEFAULT_BETA_PER_MASS:g})",
    )
    p.add_argument("--eta", action=_RenamedFlag, new="--beta-per-mass", help=argparse.SUPPRESS)
    p.add_argument(
        "--path",
        choices=("vp", "flow"),
        default="vp",
        help="vp: DDIM on the variance-preserving path (default); flow: rectified flow (SD3/Flux), Euler on sigma",
    )
    p.set_defaults(func=_cli)

"""Float64 references and float32 error bounds for the exported graphs and guided loops (export and SLD tests).

Networks. A float32 evaluation of a network (PyTorch's kernels or onnxruntime's) differs from its float64 value by
at most ``NETWORK_DEPTH * U32 * max |output|``: the per-inner-product bound of ``helpers`` (lambda sqrt(K) u)
compounds over the layers, so the factor grows with depth and width. Measured once (max |f32 - f64| / (u32 max |f64|)
over 100 random inputs each): tiny SD UNet 30, tiny VAE decoder 34, tiny CLIP text encoder 6, demo UNet 7; SD-1.4
architecture (random weights, 2-3 inputs): UNet 15, VAE decoder 20, CLIP ViT-L/14 text tower 13.
NETWORK_DEPTH = 128 leaves a margin of at least 3.7 for other kernels and CPUs.

The denoiser step. After the UNet, the step is a map of the UNet's output eps (CFG, SLD, the correction). A float32
step's error is the UNet's error pushed through that map, plus the map's own roundings. ``step_reference`` bounds
the first part by evaluating the map in float64 at the vertices of the box |delta eps| <= NETWORK_DEPTH u32 max|eps|
with one sign per branch (uncond, cond, safety): CFG and SLD act element by element across the branches, so the
worst case of their linearisation over the box lies at one of those 2^k vertices, and v and -v change it alike, so
2^(k-1) runs suffice; they also move eps_c - eps_S both ways by 2 delta, so SLD's threshold (mu jumps where
eps_c - eps_S crosses lambda) is covered when the box reaches it. The map's own roundings add
NETWORK_DEPTH u32 max |output| (a few operations on values of that size). Both a float32 PyTorch step and the
onnxruntime graph must lie within the bound of the float64 value, so they agree within twice the bound.

Sampling loops. A loop's sensitivity to its UNet's rounding depends on the trajectory (x0 = (x - sqrt(1 - abar) eps)
/ sqrt(abar) magnifies eps errors where abar is small; clipping and SLD's threshold switch). ``perturbed`` measures
it: the loop rerun with every UNet output moved by +-NETWORK_DEPTH u32 max|output| (seeded random signs), a
perturbation about ten times the measured rounding; a float32 loop lies within that relative change r of the exact
loop, and two float32 implementations within 2 r of each other.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from safe_denoiser.export.exporter import ExportOptions, ExportSource, build_denoiser, denoiser_inputs
from safe_denoiser.runtime.manifest import Manifest

U32 = 2.0**-24  # unit roundoff of float32
U16 = 2.0**-11  # unit roundoff of float16
NETWORK_DEPTH = 128  # see the module docstring


def network_bound(reference: np.ndarray | Tensor) -> float:
    """Bound on |float32 network output - float64 value| given the float64 (or float32) output."""
    return NETWORK_DEPTH * U32 * float(np.abs(np.asarray(reference, dtype=np.float64)).max())


@contextmanager
def _hooked(module: nn.Module, hook: Callable[[nn.Module, Any, Any], Any]) -> Iterator[None]:
    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def perturbed(module: nn.Module, unit: float = U32, depth: float = NETWORK_DEPTH, seed: int = 0) -> Iterator[None]:
    """Inside the block, each output of ``module`` moves by +-depth unit max|output| (seeded random signs).

    ``unit``: the unit roundoff of the precision the network runs in (``U16`` for float16 weights); ``depth``: how
    many roundings of values up to max|output| the perturbation stands for (the network's ``NETWORK_DEPTH``).
    """
    gen = torch.Generator().manual_seed(seed)

    def hook(_m: nn.Module, _i: Any, out: Any) -> Any:
        sample = out[0] if isinstance(out, tuple) else out.sample
        signs = torch.randint(0, 2, sample.shape, generator=gen).to(sample) * 2 - 1
        moved = sample + depth * unit * sample.abs().max() * signs
        return (moved, *out[1:]) if isinstance(out, tuple) else type(out)(sample=moved)

    with _hooked(module, hook):
        yield


def step_inputs(step: nn.Module, feeds: dict[str, np.ndarray]) -> list[Tensor]:
    """A step's runtime inputs (onnxruntime feeds) as tensors, in ``step.input_names`` order."""
    return [torch.from_numpy(feeds[n]) for n in step.input_names]


def _float64(values: Sequence[Tensor]) -> list[Tensor]:
    return [v.double() if v.is_floating_point() else v for v in values]


def step_reference(step: nn.Module, inputs: Sequence[Tensor]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The float64 outputs of a ``DenoiserStep`` and, per float output, the element-wise bound on a float32 step's
    error (same shape as the output). Booleans (``correction_applied``) get none: they must equal the float64 one.
    """
    step64 = copy.deepcopy(step).double().eval()
    in64 = _float64(inputs)
    names: list[str] = list(step.output_names)
    seen: dict[str, Tensor] = {}

    def capture(_m: nn.Module, _i: Any, out: Any) -> None:
        seen["eps"] = out[0]

    net = step64.unet if hasattr(step64, "unet") else step64.transformer  # DenoiserStep / FlowDenoiserStep
    with torch.no_grad(), _hooked(net, capture):
        ref = [r.double() if r.is_floating_point() else r for r in step64(*in64)]
    eps = seen["eps"]
    delta = NETWORK_DEPTH * U32 * float(eps.abs().max())
    branches = 3 if getattr(step, "sld", None) is not None else 2
    branches = 1 if getattr(step, "family", None) == "flux" else branches  # Flux: one call, no CFG batch
    per_branch = eps.shape[0] // branches
    worst = [torch.zeros_like(r) if r.is_floating_point() else None for r in ref]
    for signs in itertools.product((-1.0, 1.0), repeat=branches - 1):  # v and -v: the same first-order change
        shift = delta * torch.tensor((1.0, *signs), dtype=eps.dtype).repeat_interleave(per_branch)
        shift = shift.reshape(-1, *([1] * (eps.dim() - 1)))

        def perturb(_m: nn.Module, _i: Any, out: Any, shift: Tensor = shift) -> Any:
            return (out[0] + shift, *out[1:])

        with torch.no_grad(), _hooked(net, perturb):
            moved = step64(*in64)
        for k, (m, r) in enumerate(zip(moved, ref, strict=True)):
            w = worst[k]
            if w is not None:
                worst[k] = torch.maximum(w, (m.double() - r).abs())
    refs = {n: r.numpy() for n, r in zip(names, ref, strict=True)}
    bounds = {n: (w + network_bound(r)).numpy() for n, w, r in zip(names, worst, ref, strict=True) if w is not None}
    return refs, bounds


def within(got: np.ndarray, want: np.ndarray, bound: np.ndarray | float, factor: float = 1.0) -> bool:
    """|got - want| <= factor * bound, element by element."""
    return bool(np.all(np.abs(np.asarray(got, dtype=np.float64) - want) <= factor * np.asarray(bound)))


def check_step_graph(source: ExportSource, step: nn.Module, graph: Any, seeds: Sequence[int], batch: int = 3) -> float:
    """A denoiser graph (``graph``: its path) and the eager ``step`` on ``denoiser_inputs`` of each seed: each float
    output within twice the float32 bound of the float64 step, booleans equal to it. Returns the largest |graph -
    eager| over the float outputs."""
    from safe_denoiser.runtime.bundle import make_session

    session = make_session(graph)
    worst = 0.0
    for seed in seeds:
        inputs = denoiser_inputs(source, step, batch, seed=seed)
        refs, bounds = step_reference(step, inputs)
        feeds = {n: v.numpy() for n, v in zip(step.input_names, inputs, strict=True)}
        got = dict(zip(step.output_names, session.run(step.output_names, feeds), strict=True))
        with torch.no_grad():
            eager = dict(zip(step.output_names, (o.numpy() for o in step(*inputs)), strict=True))
        for name in step.output_names:
            if name in bounds:
                assert within(got[name], refs[name], bounds[name], 2.0), (seed, name)
                assert within(eager[name], refs[name], bounds[name], 2.0), (seed, name)
                worst = max(worst, float(np.abs(got[name] - eager[name]).max()))
            else:
                np.testing.assert_array_equal(got[name], refs[name])
    return worst


def check_graph_parity(source: ExportSource, manifest: Manifest, batch: int = ExportOptions.batch) -> None:
    """Export-time check (onnxruntime vs PyTorch float32 on the exporter's check inputs): within twice the float32
    error bound (``step_reference``; text encoder and VAE: ``network_bound``) per output; booleans identical."""
    step = build_denoiser(source)
    _, step_bounds = step_reference(step, denoiser_inputs(source, step, batch + 1, seed=1))  # the exporter's inputs
    for name, graph in manifest.graphs.items():
        diffs, scales = graph.parity_max_abs_diff, graph.parity_max_abs_value
        assert diffs, name
        for output, diff in diffs.items():
            if name == "denoiser":
                bound = float(step_bounds[output].max()) if output in step_bounds else 0.0
            else:
                bound = network_bound(np.array(scales[output]))
            print(f"{manifest.source} {name}.{output}: max abs diff {diff:.3g}, bound {bound:.3g}")
            assert diff <= 2 * bound, (name, output, diff, bound)

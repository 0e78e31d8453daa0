"""Checks that keep a bad run from looking like a good one: finite outputs, a correction window that can fire.

``FiniteWatch`` notes, at every denoiser call, whether its input and output are finite, as device tensors (no
host sync inside the sampling loop); only when an image comes out non-finite are they read, to name the step.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType
from typing import Any

import numpy as np
import torch
from torch import nn

from safe_denoiser.lightning.prompts import PromptItem, clip_text

__all__ = ["FiniteWatch", "NonFiniteOutputError", "check_finite", "check_window"]


class NonFiniteOutputError(FloatingPointError, ValueError):
    """A generated image holds NaN or Inf: never written as a valid-looking image."""


def _tensor(x: Any) -> torch.Tensor | None:
    """The sample tensor of a UNet output (a diffusers output object, a tuple) or input."""
    if isinstance(x, torch.Tensor):
        return x
    sample = getattr(x, "sample", None)
    if isinstance(sample, torch.Tensor):
        return sample
    if isinstance(x, (tuple, list)) and x and isinstance(x[0], torch.Tensor):
        return x[0]
    return None


class FiniteWatch:
    """``with FiniteWatch(pipe.unet) as watch:`` sample; then ``watch.first_bad_call()`` says where NaN/Inf began."""

    def __init__(self, module: nn.Module | None) -> None:
        self.module = module
        self.calls: list[tuple[torch.Tensor | None, torch.Tensor | None]] = []  # (input finite, output finite)
        self._handles: list[Any] = []

    def _before(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        x = _tensor(args[0] if args else kwargs.get("sample"))
        self.calls.append((None if x is None else torch.isfinite(x).all(), None))

    def _after(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        y = _tensor(out)
        if self.calls:
            self.calls[-1] = (self.calls[-1][0], None if y is None else torch.isfinite(y).all())

    def __enter__(self) -> FiniteWatch:
        if self.module is not None:
            self._handles = [
                self.module.register_forward_pre_hook(self._before, with_kwargs=True),
                self.module.register_forward_hook(self._after, with_kwargs=True),
            ]
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def first_bad_call(self) -> tuple[int, str] | None:
        """(index of the first denoiser call that saw NaN/Inf, "input" or "output"); None if none did."""
        for i, (inp, out) in enumerate(self.calls):
            if inp is not None and not bool(inp):
                return i, "input"
            if out is not None and not bool(out):
                return i, "output"
        return None


def _where(watch: FiniteWatch | None, steps: int) -> str:
    """Where the first non-finite value appeared, in denoising steps."""
    found = None if watch is None else watch.first_bad_call()
    if found is None:
        return "after the last denoising step (in the final update or the decoder)"
    call, side = found
    n = len(watch.calls) if watch is not None else 0
    step = call % steps + 1 if steps > 0 and n % steps == 0 else call + 1
    if side == "input":
        return f"at denoising step {step} of {steps} (the denoiser's input: the previous step's update made it)"
    return f"at denoising step {step} of {steps} (the denoiser's output)"


def check_finite(images: np.ndarray, items: Sequence[PromptItem], watch: FiniteWatch | None, steps: int) -> None:
    """Raise ``NonFiniteOutputError`` naming the items and the step if any image holds NaN or Inf."""
    flat = np.asarray(images).reshape(len(items), -1)
    bad = [it for it, ok in zip(items, np.isfinite(flat).all(axis=1), strict=True) if not ok]
    if not bad:
        return
    names = ", ".join(f"{clip_text(it.id)} (seed {it.seed})" for it in bad[:5])
    raise NonFiniteOutputError(
        f"item(s) {names}{' and more' if len(bad) > 5 else ''}: the generated image holds NaN or Inf, first "
        f"{_where(watch, steps)}; nothing was written for this batch. Check the guidance scale, the bank's values "
        "and the safe-denoiser settings"
    )


def check_window(window: tuple[float, float], scheduler: Any, steps: int) -> None:
    """Raise if none of the ``steps`` timesteps ``scheduler`` samples lies in ``window`` (it would never fire)."""
    fresh = type(scheduler).from_config(scheduler.config)
    if scheduler.config.get("use_dynamic_shifting", False):  # Flux: mu depends on the image size; base_shift's
        fresh.set_timesteps(steps, mu=scheduler.config.get("base_shift", 0.5))  # sigmas are the least shifted
    else:
        fresh.set_timesteps(steps)
    times = [float(t) for t in fresh.timesteps]
    if any(window[0] <= t <= window[1] for t in times):
        return
    train = scheduler.config.get("num_train_timesteps", "?")
    raise ValueError(
        f"model.safe_denoiser.window must contain at least one sampled timestep, got [{window[0]:g}, {window[1]:g}]; "
        f"the {steps} steps sample timesteps {min(times):g}..{max(times):g} of a schedule of {train} training "
        "steps, so the correction would never fire"
    )

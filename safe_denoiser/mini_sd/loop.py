"""One deterministic training loop for the miniature's stages: AdamW, warm-up then cosine, optional EMA, tqdm.

Determinism: the caller seeds torch before building its network; the loop runs under a fixed thread count with
torch's deterministic algorithms, and every random draw of a step comes from generators the stage seeded. The same
command then writes byte-identical safetensors (TRAINING.md records the check).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["Optimisation", "TrainResult", "train_steps"]


@dataclass(frozen=True)
class Optimisation:
    """How a stage optimises: ``steps`` AdamW steps at peak ``lr`` after ``warmup`` linear steps, cosine to 5%."""

    steps: int
    lr: float
    warmup: int = 100
    weight_decay: float = 1e-4
    ema_decay: float | None = None

    def __post_init__(self) -> None:
        if self.steps < 1 or self.lr <= 0 or self.warmup < 0:
            raise ValueError(f"steps must be >= 1, lr > 0 and warmup >= 0, got {self}")

    def factor(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.steps - self.warmup))
        return 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class TrainResult:
    losses: list[float]
    wall_s: float
    cpu_s: float  # process CPU time: on a shared machine the honest cost next to the wall time

    def summary(self) -> dict[str, object]:
        """First 20 and last 100 steps' mean loss, a curve of 10 means, the wall time."""
        n = max(1, len(self.losses) // 10)
        head, tail = self.losses[:20], self.losses[-100:]
        return {
            "first_loss_mean_20": round(sum(head) / max(1, len(head)), 5),
            "final_loss_mean_100": round(sum(tail) / max(1, len(tail)), 5),
            "loss_curve": [
                round(sum(c) / len(c), 5) for c in (self.losses[i : i + n] for i in range(0, len(self.losses), n))
            ],
            "wall_time_s": round(self.wall_s, 1),
            "cpu_time_s": round(self.cpu_s, 1),
        }


def train_steps(
    params: Iterable[nn.Parameter],
    loss_at: Callable[[int], Tensor],
    opt: Optimisation,
    desc: str,
    ema: tuple[nn.Module, nn.Module] | None = None,
) -> TrainResult:
    """Run ``opt.steps`` steps of ``loss_at(step)``; ``ema`` = (model, averaged copy) is updated after each step."""
    from tqdm.auto import tqdm

    optimiser = torch.optim.AdamW(list(params), lr=opt.lr, weight_decay=opt.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, opt.factor)
    losses: list[float] = []
    start, cpu_start = time.perf_counter(), time.process_time()
    bar = tqdm(range(opt.steps), desc=desc, mininterval=2.0, dynamic_ncols=True)
    for step in bar:
        loss = loss_at(step)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if ema is not None and opt.ema_decay is not None:
            _ema_update(*ema, min(opt.ema_decay, (1.0 + step) / (10.0 + step)))
        if step % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
    return TrainResult(losses, time.perf_counter() - start, time.process_time() - cpu_start)


@torch.no_grad()
def _ema_update(model: nn.Module, average: nn.Module, decay: float) -> None:
    for p_avg, p in zip(average.parameters(), model.parameters(), strict=True):
        p_avg.lerp_(p.detach(), 1.0 - decay)
    for b_avg, b in zip(average.buffers(), model.buffers(), strict=True):
        b_avg.copy_(b)

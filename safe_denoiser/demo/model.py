"""``DigitsDiffusion``: a small class-conditional DDPM on scikit-learn's 8x8 digits, trained on a CPU.

The bundled default model of safe-denoiser: a real diffusion model (not random weights) whose data, judge and
weights all ship inside the package, so the safe denoiser can be demonstrated and tested offline.

- Data: the ``generator`` split of ``safe_denoiser.demo.digits`` (898 images, 8x8, [-1, 1]).
- Model: a diffusers ``UNet2DModel`` (``unet_config``) with 11 class embeddings: digits 0..9 and ``NULL_CLASS``
  = 10, the "no class" token of classifier-free guidance. During training each label is replaced by the null
  class with probability ``label_dropout``, so one network gives both the conditional and unconditional eps.
- Noise: DDPM, 1,000 steps, cosine ("squaredcos_cap_v2") betas, which suit small images better than the
  linear schedule (Nichol & Dhariwal 2021); epsilon prediction; plain MSE loss on the noise.
- An exponential moving average (EMA) of the weights is kept and is what gets saved: with a short CPU
  training run the EMA weights give visibly cleaner samples than the last iterate.

Train (the shipped weights were made by this command; ``assets/digits/train_config.json`` records the rest)::

    python -m safe_denoiser.demo.model train --out safe_denoiser/assets/digits --max-steps 2400 --seed 0
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from diffusers.models.unets.unet_2d import UNet2DModel
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from safe_denoiser.demo.digits import (
    BUNDLED_DIR,
    IMAGE_SIZE,
    NULL_CLASS,
    NUM_CLASSES,
    NUM_LABELS,
    SUPER_CLASSES,
    load_split,
)
from safe_denoiser.demo.training import fit
from safe_denoiser.files import atomic_write, atomic_write_json
from safe_denoiser.threads import torch_threads

__all__ = [
    "DigitsDiffusion",
    "main",
    "make_scheduler",
    "make_unet",
    "scheduler_config",
    "train",
    "unet_config",
]


def unet_config(
    block_out_channels: Sequence[int] = (32, 64, 64),
    layers_per_block: int = 1,
    attention: bool = True,
    norm_num_groups: int = 16,
    dropout: float = 0.0,
    time_scale_shift: str = "default",
    num_labels: int = NUM_LABELS,
) -> dict[str, Any]:
    """UNet2DModel keyword arguments for 1-channel 8x8 digits with ``num_labels`` class embeddings.

    Resolutions 8 -> 4 -> 2 for three blocks. One self-attention block, at the coarsest level only, where it
    is cheap (2x2 tokens) and lets every position see the whole digit.
    """
    n = len(block_out_channels)
    down = ["DownBlock2D"] * n
    up = ["UpBlock2D"] * n
    if attention:
        down[-1] = "AttnDownBlock2D"
        up[0] = "AttnUpBlock2D"
    return {
        "sample_size": IMAGE_SIZE,
        "in_channels": 1,
        "out_channels": 1,
        "block_out_channels": tuple(int(c) for c in block_out_channels),
        "layers_per_block": int(layers_per_block),
        "down_block_types": tuple(down),
        "up_block_types": tuple(up),
        "add_attention": bool(attention),
        "attention_head_dim": int(block_out_channels[-1]) // 2,
        "norm_num_groups": int(norm_num_groups),
        "dropout": float(dropout),
        # "default" adds the (time + class) embedding as a bias; "scale_shift" is FiLM (scale and shift).
        "resnet_time_scale_shift": time_scale_shift,
        "num_class_embeds": int(num_labels),
    }


def make_unet(**overrides: Any) -> UNet2DModel:
    """A fresh (random-weight) UNet2DModel from ``unet_config(**overrides)``."""
    return UNet2DModel(**unet_config(**overrides))


def scheduler_config() -> dict[str, Any]:
    """The noise schedule shared by training and sampling (saved as ``scheduler/scheduler_config.json``).

    ``timestep_spacing="trailing"`` makes few-step samplers (DDIM 50) start at t = 999, the pure-noise end of
    the schedule, instead of t = 980 (Lin et al. 2024, "Common diffusion noise schedules ... are flawed").
    """
    return {
        "num_train_timesteps": 1000,
        "beta_schedule": "squaredcos_cap_v2",
        "prediction_type": "epsilon",
        "clip_sample": True,
        "clip_sample_range": 1.0,
        "timestep_spacing": "trailing",
    }


def make_scheduler() -> DDPMScheduler:
    """A ``DDPMScheduler`` with ``scheduler_config()``."""
    return DDPMScheduler(**scheduler_config())


class DigitsDiffusion(L.LightningModule):
    """Class-conditional epsilon-prediction DDPM on 8x8 digits; ``ema_unet`` is the averaged copy to ship."""

    alphas_cumprod: Tensor

    def __init__(
        self,
        block_out_channels: Sequence[int] = (32, 64, 64),
        layers_per_block: int = 1,
        attention: bool = True,
        norm_num_groups: int = 16,
        dropout: float = 0.0,
        time_scale_shift: str = "default",
        lr: float = 2e-3,
        weight_decay: float = 1e-4,
        warmup_steps: int = 100,
        total_steps: int = 2400,
        label_dropout: float = 0.15,
        ema_decay: float = 0.995,
        super_class_prob: float = 0.3,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.unet = make_unet(
            block_out_channels=block_out_channels,
            layers_per_block=layers_per_block,
            attention=attention,
            norm_num_groups=norm_num_groups,
            dropout=dropout,
            time_scale_shift=time_scale_shift,
        )
        # A frozen copy updated after each optimizer step; never seen by the optimizer.
        self.ema_unet = copy.deepcopy(self.unet).requires_grad_(False)
        self.noise_scheduler = make_scheduler()
        self.register_buffer("alphas_cumprod", self.noise_scheduler.alphas_cumprod.clone(), persistent=False)

    def forward(self, x_t: Tensor, t: Tensor, class_labels: Tensor) -> Tensor:
        """Predicted noise eps(x_t, t, class) of the trained (non-EMA) network."""
        out: Tensor = self.unet(x_t, t, class_labels=class_labels).sample
        return out

    def diffusion_loss(self, x0: Tensor, labels: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """MSE between the true and the predicted noise, at uniformly drawn timesteps, with label dropout."""
        b = x0.shape[0]
        dev = x0.device
        t = torch.randint(0, self.noise_scheduler.config["num_train_timesteps"], (b,), device=dev, generator=generator)
        noise = torch.randn(x0.shape, device=dev, generator=generator, dtype=x0.dtype)
        labels = self._super_labels(labels, generator)
        drop = torch.rand(b, device=dev, generator=generator) < self.hparams["label_dropout"]
        labels = torch.where(drop, torch.full_like(labels, NULL_CLASS), labels)
        ab = self.alphas_cumprod.to(x0.dtype)[t].view(b, 1, 1, 1)
        x_t = ab.sqrt() * x0 + (1.0 - ab).sqrt() * noise
        return F.mse_loss(self(x_t, t, labels), noise)

    def _super_labels(self, labels: Tensor, generator: torch.Generator | None) -> Tensor:
        """With probability ``super_class_prob``, a digit's label becomes a super-class that contains it (uniform)."""
        p = float(self.hparams.get("super_class_prob", 0.0))
        if p <= 0:
            return labels
        ids = torch.tensor(list(SUPER_CLASSES), device=labels.device)
        member = torch.tensor(
            [[c in SUPER_CLASSES[k] for k in SUPER_CLASSES] for c in range(NUM_CLASSES)], device=labels.device
        )[labels]  # (B, K): which super-classes contain each label
        pick = torch.multinomial(member.float(), 1, generator=generator).squeeze(1)  # uniform among members
        use = torch.rand(labels.shape[0], device=labels.device, generator=generator) < p
        return torch.where(use, ids[pick], labels)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """One noise-prediction step; logs ``train_loss``."""
        x0, labels = batch
        loss = self.diffusion_loss(x0, labels)
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=x0.shape[0])
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """EMA update with the usual warm-up: decay min(d, (1 + n) / (10 + n)) so early averages are not stale."""
        n = self.global_step
        decay = min(float(self.hparams["ema_decay"]), (1.0 + n) / (10.0 + n))
        with torch.no_grad():
            for p_ema, p in zip(self.ema_unet.parameters(), self.unet.parameters(), strict=True):
                p_ema.lerp_(p.detach(), 1.0 - decay)
            for b_ema, b in zip(self.ema_unet.buffers(), self.unet.buffers(), strict=True):
                b_ema.copy_(b)

    def configure_optimizers(self) -> Any:
        """AdamW with linear warm-up then cosine decay to 5% of the peak learning rate."""
        opt = torch.optim.AdamW(
            self.unet.parameters(), lr=self.hparams["lr"], weight_decay=self.hparams["weight_decay"]
        )
        warm = max(1, int(self.hparams["warmup_steps"]))
        total = max(warm + 1, int(self.hparams["total_steps"]))

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            progress = min(1.0, (step - warm) / (total - warm))
            return 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _dataloader(batch_size: int, seed: int) -> DataLoader[tuple[Tensor, ...]]:
    data = load_split("generator")
    ds = TensorDataset(data.images, data.labels)
    g = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=True, drop_last=True, generator=g, num_workers=0)


class _LossHistory(L.Callback):
    """Keeps the per-step training loss so that the run's record can report a smoothed final value."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss.detach()))


def _chunks(values: list[float], size: int) -> list[list[float]]:
    return [values[i : i + size] for i in range(0, len(values), size)]


def train(
    out: str | Path,
    max_steps: int = 2400,
    seed: int = 0,
    batch_size: int = 64,
    threads: int | None = None,
    sample_grid: bool = True,
    **hparams: Any,
) -> dict[str, Any]:
    """Train ``DigitsDiffusion`` on the generator split and save the EMA weights as a diffusers pipeline folder.

    ``out`` receives ``model_index.json``, ``unet/`` (config.json + diffusion_pytorch_model.safetensors),
    ``scheduler/`` and ``train_config.json`` (command, seed, steps, losses, wall time). Returns that record.
    ``threads`` sets torch's intra-op thread count for the run (the CLI passes 1: on a busy 2-core machine a
    second OpenMP thread made each step 5x slower, spinning while it waited for a core).
    """
    from safe_denoiser.demo.pipeline import DigitsPipeline

    history = _LossHistory()
    model, trainer, wall = fit(
        lambda: DigitsDiffusion(total_steps=max_steps, **hparams),
        lambda: _dataloader(batch_size, seed),
        seed=seed,
        threads=threads,
        callbacks=[history],
        max_steps=max_steps,
        log_every_n_steps=50,
    )

    out = Path(out)
    _save_ema_pipeline(model, out)
    record: dict[str, Any] = {
        "command": _train_command(out, max_steps, seed),
        "seed": seed,
        "max_steps": max_steps,
        "epochs": trainer.current_epoch,
        "batch_size": batch_size,
        "threads": threads if threads is not None else torch.get_num_threads(),
        "hparams": {k: (list(v) if isinstance(v, tuple) else v) for k, v in model.hparams.items()},
        "unet_parameters": sum(p.numel() for p in model.unet.parameters()),
        "train_images": len(load_split("generator")),
        **_loss_summary(history.losses),
        "wall_time_s": round(wall, 1),
        "weights": "EMA",
        "versions": _versions(),
    }
    atomic_write_json(out / "train_config.json", record)
    if sample_grid:
        save_sample_grid(out / "samples.png", DigitsPipeline.from_pretrained_dir(out, scheduler="ddim"))
    return record


def _save_ema_pipeline(model: DigitsDiffusion, out: Path) -> None:
    """Write the EMA weights and the sampling scheduler to ``out`` as a world-readable diffusers pipeline folder."""
    from safe_denoiser.demo.pipeline import DigitsPipeline

    out.mkdir(parents=True, exist_ok=True)
    model.ema_unet.eval()
    pipe = DigitsPipeline(unet=model.ema_unet, scheduler=make_scheduler())
    pipe.save_pretrained(out, safe_serialization=True)
    # diffusers writes the weights through a private temporary file (mode 0600); shipped files must be readable.
    for f in out.rglob("*"):
        if f.is_file():
            f.chmod(0o644)


def _train_command(out: Path, max_steps: int, seed: int) -> str:
    """How the run was started: the command line under ``python -m``, else the equivalent ``train`` call."""
    if sys.argv and sys.argv[0].endswith("model.py"):
        return "python -m safe_denoiser.demo.model " + " ".join(sys.argv[1:])
    return f"safe_denoiser.demo.model.train(out={str(out)!r}, max_steps={max_steps}, seed={seed})"


def _loss_summary(losses: list[float]) -> dict[str, Any]:
    """The first 20 and last 100 steps' mean loss and the curve of 200-step means (still falling at the end?)."""
    head, tail = losses[:20], losses[-100:]
    return {
        "first_loss_mean_20": sum(head) / max(1, len(head)),
        "final_loss_mean_100": sum(tail) / max(1, len(tail)),
        "loss_curve_200": [round(sum(c) / len(c), 4) for c in _chunks(losses, 200)],
    }


def _versions() -> dict[str, str]:
    """The library versions the run used."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": L.__version__,
        "diffusers": __import__("diffusers").__version__,
    }


def save_sample_grid(
    path: str | Path,
    pipe: Any,
    per_class: int = 10,
    guidance_scale: float = 2.0,
    num_inference_steps: int = 50,
    seed: int = 0,
    scale: int = 4,
) -> Tensor:
    """A ``NUM_CLASSES x per_class`` grid PNG, one row per digit; returns the samples in model space [-1, 1]."""
    from PIL import Image

    labels = [c for c in range(NUM_CLASSES) for _ in range(per_class)]
    gens = [torch.Generator().manual_seed(seed * 100_000 + i) for i in range(len(labels))]
    x: Tensor = pipe(
        labels,
        guidance_scale=guidance_scale,
        num_inference_steps=num_inference_steps,
        generator=gens,
        output_type="latent",
    ).images
    img = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (N, 1, 8, 8)
    pad = 1
    h = IMAGE_SIZE + pad
    grid = torch.full((NUM_CLASSES * h + pad, per_class * h + pad), 255, dtype=torch.uint8)
    for i in range(len(labels)):
        r, c = divmod(i, per_class)
        grid[pad + r * h : pad + r * h + IMAGE_SIZE, pad + c * h : pad + c * h + IMAGE_SIZE] = img[i, 0]
    pil = Image.fromarray(grid.numpy(), mode="L")
    pil = pil.resize((pil.width * scale, pil.height * scale), Image.Resampling.NEAREST)
    atomic_write(path, lambda tmp: pil.save(tmp, format="PNG"))
    return x


def evaluate(
    folder: str | Path,
    judge_folder: str | Path | None = None,
    per_class: int = 50,
    guidance_scales: Sequence[float] = (1.0, 1.5, 2.0, 3.0),
    num_inference_steps: int = 50,
    scheduler: str = "ddim",
    seed: int = 0,
) -> dict[str, Any]:
    """Judge the model's samples: per requested class, the fraction classified as that class (conditional
    accuracy), and the Frechet distance of judge features to the held-out ``eval`` split, for each CFG scale.

    Initial noise of image i comes from ``torch.Generator().manual_seed(seed * 100_000 + i)``.
    """
    from safe_denoiser.demo.judge import DigitsJudge
    from safe_denoiser.demo.pipeline import DigitsPipeline
    from safe_denoiser.evaluation.metrics import frechet_distance

    pipe: Any = DigitsPipeline.from_pretrained_dir(folder, scheduler=scheduler)
    judge = DigitsJudge.load(judge_folder if judge_folder is not None else folder)
    real = load_split("eval")
    labels = torch.arange(NUM_CLASSES).repeat_interleave(per_class)
    results: dict[str, Any] = {
        "scheduler": scheduler,
        "num_inference_steps": num_inference_steps,
        "per_class": per_class,
        "seed": seed,
        "fd_real_judge_vs_eval": frechet_distance(
            judge.features(load_split("judge").images), judge.features(real.images)
        ),
        "by_guidance_scale": {},
    }
    for w in guidance_scales:
        gens = [torch.Generator().manual_seed(seed * 100_000 + i) for i in range(labels.shape[0])]
        out = pipe(
            labels, guidance_scale=w, num_inference_steps=num_inference_steps, generator=gens, output_type="latent"
        )
        x: Tensor = out.images
        with torch.no_grad():
            pred = judge.predict(x)
            fd = frechet_distance(judge.features(x), judge.features(real.images))
        per = [float((pred[labels == c] == c).float().mean()) for c in range(NUM_CLASSES)]
        results["by_guidance_scale"][str(w)] = {
            "accuracy": float((pred == labels).float().mean()),
            "per_class_accuracy": [round(a, 3) for a in per],
            "fd_to_eval": round(fd, 3),
        }
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m safe_denoiser.demo.model train --out DIR --max-steps N --seed S``."""
    parser = argparse.ArgumentParser(prog="python -m safe_denoiser.demo.model", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train the digits diffusion model and save it as a pipeline folder")
    p.add_argument("--out", default=str(BUNDLED_DIR))
    p.add_argument("--max-steps", type=int, default=2400)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--layers-per-block", type=int, default=1)
    p.add_argument("--block-out-channels", type=int, nargs="+", default=[32, 64, 64])
    p.add_argument("--label-dropout", type=float, default=0.15)
    p.add_argument("--super-class-prob", type=float, default=0.3, help="probability a label becomes a super-class")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--time-scale-shift", default="default", choices=["default", "scale_shift"])
    p.add_argument("--no-grid", action="store_true", help="skip writing samples.png")
    e = sub.add_parser("evaluate", help="judge accuracy per class and Frechet distance of generated samples")
    e.add_argument("--out", default=str(BUNDLED_DIR), help="pipeline folder (also holds the judge unless --judge)")
    e.add_argument("--judge", default=None)
    e.add_argument("--per-class", type=int, default=50)
    e.add_argument("--guidance-scales", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0])
    e.add_argument("--steps", type=int, default=50)
    e.add_argument("--scheduler", default="ddim")
    e.add_argument("--threads", type=int, default=1)
    e.add_argument("--save", action="store_true", help="write the result to OUT/eval_<scheduler>.json")
    args = parser.parse_args(argv)
    if args.command == "evaluate":
        with torch_threads(args.threads):
            res = evaluate(args.out, args.judge, args.per_class, args.guidance_scales, args.steps, args.scheduler)
        res["command"] = "python -m safe_denoiser.demo.model " + " ".join(sys.argv[1:] if argv is None else argv)
        text = json.dumps(res, indent=2)
        print(text)
        if args.save:
            atomic_write_json(Path(args.out) / f"eval_{args.scheduler}.json", res)
        return 0
    record = train(
        args.out,
        max_steps=args.max_steps,
        seed=args.seed,
        batch_size=args.batch_size,
        threads=args.threads,
        sample_grid=not args.no_grid,
        lr=args.lr,
        layers_per_block=args.layers_per_block,
        block_out_channels=tuple(args.block_out_channels),
        label_dropout=args.label_dropout,
        super_class_prob=args.super_class_prob,
        dropout=args.dropout,
        time_scale_shift=args.time_scale_shift,
    )
    print(json.dumps({k: record[k] for k in ("final_loss_mean_100", "wall_time_s", "epochs")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

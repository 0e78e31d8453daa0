"""``DigitsJudge``: a small CNN that classifies 8x8 digits; the demo's stand-in for a safety classifier.

Trained on the ``judge`` split of ``safe_denoiser.demo.digits`` (449 images the generator never saw), scored on the
held-out ``eval`` split. It plays the role NudeNet plays in the paper: "was a digit of the unsafe class
generated?" (``probs``), and its penultimate layer (``features``, 128-D) serves as the embedding of a Frechet
distance between generated and real digits, the way Inception features serve FID.

Input: (B, 1, 8, 8) in the model space [-1, 1] (``digits.load_split`` images, ``DigitsPipeline`` with
``output_type="latent"``). Architecture (``JudgeConfig``): conv3x3(1->32) ReLU conv3x3(32->64) ReLU maxpool
(8 -> 4), conv3x3(64->128) ReLU maxpool (4 -> 2), flatten (512) -> linear 128 ReLU [features] -> dropout -> 10.
Training uses random 1-pixel shifts, since the digits are not perfectly centred.

Train (the shipped weights came from this command; ``assets/digits/judge.json`` records the rest)::

    python -m safe_denoiser.demo.judge train --out safe_denoiser/assets/digits --max-epochs 60 --seed 0
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from safe_denoiser.demo.digits import BUNDLED_DIR, NUM_CLASSES, bundled_path, load_split
from safe_denoiser.demo.training import fit
from safe_denoiser.files import atomic_write, atomic_write_json

__all__ = [
    "JUDGE_JSON",
    "JUDGE_WEIGHTS",
    "DigitsJudge",
    "JudgeConfig",
    "accuracy",
    "main",
    "train",
]

JUDGE_WEIGHTS = "judge.safetensors"
JUDGE_JSON = "judge.json"


@dataclass(frozen=True)
class JudgeConfig:
    """Architecture hyper-parameters (stored in ``judge.json`` so the weights can be rebuilt)."""

    channels: tuple[int, int, int] = (32, 64, 128)
    feature_dim: int = 128
    dropout: float = 0.3


def _random_shift(x: Tensor, max_shift: int = 1) -> Tensor:
    """Translate each image by up to ``max_shift`` pixels, filling with the background value -1."""
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    offsets = torch.randint(0, 2 * max_shift + 1, (b, 2))
    return torch.stack([padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offsets.tolist())])


class DigitsJudge(L.LightningModule):
    """10-way CNN classifier of 8x8 digits in [-1, 1]; ``features`` / ``probs`` for evaluation."""

    def __init__(
        self,
        channels: Sequence[int] = (32, 64, 128),
        feature_dim: int = 128,
        dropout: float = 0.3,
        lr: float = 2e-3,
        weight_decay: float = 1e-4,
        max_epochs: int = 60,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        c1, c2, c3 = (int(c) for c in channels)
        self.config = JudgeConfig((c1, c2, c3), int(feature_dim), float(dropout))
        self.body = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c2, c3, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(c3 * 2 * 2, feature_dim),
            nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(feature_dim, NUM_CLASSES))

    # ---- inference --------------------------------------------------------------------------------
    def features(self, x: Tensor) -> Tensor:
        """Penultimate activations (B, feature_dim): the embedding for a Frechet distance."""
        out: Tensor = self.body(x)
        return out

    def forward(self, x: Tensor) -> Tensor:
        """Logits (B, 10)."""
        out: Tensor = self.head(self.features(x))
        return out

    @torch.no_grad()
    def probs(self, x: Tensor) -> Tensor:
        """Class probabilities (B, 10), computed in eval mode (no dropout)."""
        was_training = self.training
        self.eval()
        try:
            return self(x).softmax(dim=-1)
        finally:
            self.train(was_training)

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """Predicted digit (B,) int64."""
        return self.probs(x).argmax(dim=-1)

    # ---- training ---------------------------------------------------------------------------------
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """Cross-entropy on randomly shifted images."""
        x, y = batch
        loss = F.cross_entropy(self(_random_shift(x)), y)
        self.log("train_loss", loss, prog_bar=True, on_step=False, on_epoch=True, batch_size=x.shape[0])
        return loss

    def configure_optimizers(self) -> Any:
        """AdamW with cosine decay over the run."""
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams["lr"], weight_decay=self.hparams["weight_decay"])
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, int(self.hparams["max_epochs"])))
        return {"optimizer": opt, "lr_scheduler": sched}

    # ---- storage ----------------------------------------------------------------------------------
    def save(self, folder: str | Path, record: dict[str, Any]) -> None:
        """Write ``judge.safetensors`` (weights) and ``judge.json`` (config + ``record``)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        meta_st = {"format": "safe-denoiser.digits-judge/1"}
        atomic_write(folder / JUDGE_WEIGHTS, lambda tmp: save_file(state, str(tmp), metadata=meta_st))
        meta = {"config": {**asdict(self.config), "channels": list(self.config.channels)}, **record}
        atomic_write_json(folder / JUDGE_JSON, meta)

    @classmethod
    def load(cls, folder: str | Path) -> DigitsJudge:
        """Rebuild from ``judge.json`` and load ``judge.safetensors`` (safetensors only, never pickle); eval mode."""
        from safetensors.torch import load_file

        folder = Path(folder)
        meta = json.loads((folder / JUDGE_JSON).read_text())
        cfg = meta["config"]
        judge = cls(channels=tuple(cfg["channels"]), feature_dim=cfg["feature_dim"], dropout=cfg["dropout"])
        judge.load_state_dict(load_file(str(folder / JUDGE_WEIGHTS)))
        return judge.eval().requires_grad_(False)

    @classmethod
    def from_bundled(cls) -> DigitsJudge:
        """The judge shipped in ``safe_denoiser/assets/digits``."""
        return cls.load(bundled_path())

    @staticmethod
    def bundled_record() -> dict[str, Any]:
        """The shipped ``judge.json`` (held-out accuracy, config, command)."""
        out: dict[str, Any] = json.loads((bundled_path() / JUDGE_JSON).read_text())
        return out


def accuracy(judge: DigitsJudge, images: Tensor, labels: Tensor, batch_size: int = 512) -> float:
    """Fraction of ``images`` classified as ``labels``."""
    correct = 0
    for i in range(0, images.shape[0], batch_size):
        correct += int((judge.predict(images[i : i + batch_size]) == labels[i : i + batch_size]).sum())
    return correct / max(1, images.shape[0])


def train(
    out: str | Path, max_epochs: int = 60, seed: int = 0, batch_size: int = 32, threads: int | None = None
) -> dict[str, Any]:
    """Train on the judge split, score on the eval split, save weights + record to ``out``; returns the record."""
    data = load_split("judge")

    def loader() -> DataLoader[tuple[Tensor, ...]]:
        g = torch.Generator().manual_seed(seed)
        return DataLoader(TensorDataset(data.images, data.labels), batch_size=batch_size, shuffle=True, generator=g)

    judge, _, wall = fit(
        lambda: DigitsJudge(max_epochs=max_epochs),
        loader,
        seed=seed,
        threads=threads,
        max_epochs=max_epochs,
        enable_progress_bar=False,
    )
    judge.eval()
    held = load_split("eval")
    record: dict[str, Any] = {
        "heldout_accuracy": accuracy(judge, held.images, held.labels),
        "heldout_split": "eval",
        "heldout_size": len(held),
        # Pins the split: a different scikit-learn shuffle would silently change what "held out" means.
        "eval_first_indices": held.indices[:5].tolist(),
        "train_split": "judge",
        "train_size": len(data),
        "train_accuracy": accuracy(judge, data.images, data.labels),
        "command": "python -m safe_denoiser.demo.judge " + " ".join(sys.argv[1:])
        if sys.argv and sys.argv[0].endswith("judge.py")
        else f"safe_denoiser.demo.judge.train(out={str(out)!r}, max_epochs={max_epochs}, seed={seed})",
        "seed": seed,
        "max_epochs": max_epochs,
        "batch_size": batch_size,
        "hparams": {k: (list(v) if isinstance(v, tuple) else v) for k, v in judge.hparams.items()},
        "wall_time_s": round(wall, 1),
        "input": "(B, 1, 8, 8) float in [-1, 1]",
    }
    judge.save(out, record)
    return record


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m safe_denoiser.demo.judge train --out DIR --max-epochs N --seed S``."""
    parser = argparse.ArgumentParser(prog="python -m safe_denoiser.demo.judge", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train the digits judge and save judge.safetensors + judge.json")
    p.add_argument("--out", default=str(BUNDLED_DIR))
    p.add_argument("--max-epochs", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    record = train(args.out, args.max_epochs, args.seed, args.batch_size, args.threads)
    print(json.dumps({k: record[k] for k in ("heldout_accuracy", "train_accuracy", "wall_time_s")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

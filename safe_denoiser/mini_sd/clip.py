"""The miniature's CLIP: a tiny ``transformers.CLIPModel`` trained contrastively on (digit image, caption) pairs.

Text tower: 4 layers, width 64, 4 heads, quick-GELU, 77 positions, the BPE vocabulary of ``tokenizer.py``. Vision
tower: a ViT on 32 x 32 RGB in [-1, 1] (patch 8: a 4 x 4 grid, each patch 2 x 2 of the 8 x 8 digit), 4 layers,
width 64. Projection 64.

Loss: CLIP's symmetric cross-entropy over in-batch image/caption similarities, with one change that a tiny data
set needs: many captions of a batch are true of many of its images ("any digit", two 8s), so the target of each
row (column) is uniform over every caption (image) whose ``Meaning`` the image satisfies, not only the diagonal.
Images get a random shift of up to 2 pixels. The text tower is then frozen under the UNet (``text_encoder/``), and
the whole model is saved in ``clip/`` for the CLIP-score column.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from safe_denoiser.mini_sd.captions import WORDS, Caption, heldout_captions, image_attributes, sample_caption
from safe_denoiser.mini_sd.data import IMAGE_SIZE, MAX_TOKENS, render_split
from safe_denoiser.mini_sd.loop import Optimisation, train_steps

__all__ = ["CaptionedImages", "clip_config", "evaluate_clip", "load_clip", "random_shift", "train_clip"]


def clip_config(tokenizer: Any, width: int = 64, layers: int = 4) -> Any:
    from transformers import CLIPConfig

    common: dict[str, Any] = {"hidden_size": width, "intermediate_size": 4 * width, "num_hidden_layers": layers}
    common |= {"num_attention_heads": 4, "hidden_act": "quick_gelu"}
    text = {
        **common,
        "vocab_size": len(tokenizer),
        "max_position_embeddings": MAX_TOKENS,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,  # the pooled output is the first EOS
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision = {**common, "image_size": IMAGE_SIZE, "patch_size": 8, "num_channels": 3}
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=width)


@dataclass(frozen=True)
class CaptionedImages:
    """A split's images (N, 3, 32, 32) in [-1, 1], digits and measured stroke attributes."""

    images: Tensor
    labels: np.ndarray
    attributes: list[frozenset[str]]

    @classmethod
    def of(cls, split: Any) -> CaptionedImages:
        r = render_split(split)
        return cls(r.images(), r.labels, image_attributes(r.raw, r.labels))

    def captions(self, rng: random.Random, idx: list[int]) -> list[Caption]:
        return [sample_caption(rng, int(self.labels[i]), self.attributes[i]) for i in idx]

    def admits(self, idx: list[int], captions: list[Caption]) -> Tensor:
        """(B_images, B_captions) float: 1 where the caption is true of the image."""
        rows = [[c.meaning.admits(int(self.labels[i]), self.attributes[i]) for c in captions] for i in idx]
        return torch.tensor(rows, dtype=torch.float32)


def random_shift(x: Tensor, generator: torch.Generator, max_shift: int = 2) -> Tensor:
    """Translate each image by up to ``max_shift`` pixels, filling with the background -1."""
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    offsets = torch.randint(0, 2 * max_shift + 1, (b, 2), generator=generator).tolist()
    return torch.stack([padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offsets)])


def _soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    return -(targets / targets.sum(dim=1, keepdim=True) * logits.log_softmax(dim=1)).sum(dim=1).mean()


def train_clip(tokenizer: Any, opt: Optimisation, seed: int, batch_size: int = 128) -> tuple[Any, dict[str, Any]]:
    """Train the tiny CLIPModel on the generator split; returns (model in eval mode, loss summary)."""
    from transformers import CLIPModel

    torch.manual_seed(seed)
    model = CLIPModel(clip_config(tokenizer)).train()
    data = CaptionedImages.of("generator")
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)

    def loss_at(step: int) -> Tensor:
        idx = torch.randperm(len(data.labels), generator=gen)[:batch_size].tolist()
        captions = data.captions(rng, idx)
        ids = tokenizer([c.text for c in captions], padding="longest", return_tensors="pt").input_ids
        out = model(input_ids=ids, pixel_values=random_shift(data.images[idx], gen), return_loss=False)
        match = data.admits(idx, captions)
        return 0.5 * (
            _soft_cross_entropy(out.logits_per_image, match) + _soft_cross_entropy(out.logits_per_text, match.T)
        )

    result = train_steps(model.parameters(), loss_at, opt, "clip")
    return model.eval(), result.summary()


@torch.no_grad()
def embed_texts(model: Any, tokenizer: Any, texts: list[str]) -> Tensor:
    ids = tokenizer(texts, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt").input_ids
    return F.normalize(model.text_projection(model.text_model(input_ids=ids).pooler_output), dim=-1)


@torch.no_grad()
def embed_images(model: Any, images: Tensor) -> Tensor:
    return F.normalize(model.visual_projection(model.vision_model(pixel_values=images).pooler_output), dim=-1)


def evaluate_clip(model: Any, tokenizer: Any, split: str = "eval", seed: int = 0) -> dict[str, Any]:
    """Zero-shot digit accuracy on held-out images with a training prompt and a held-out prompt, and the top-1
    precision of 500 held-out captions (is the best-matching held-out image one the caption is true of?)."""
    data = CaptionedImages.of(split)
    img = embed_images(model, data.images)
    labels = torch.from_numpy(data.labels)
    zero_shot = {}
    for name, template in (("training prompt", "a handwritten {}"), ("held-out prompt", "a sketch of the digit {}")):
        text = embed_texts(model, tokenizer, [template.format(w) for w in WORDS])
        zero_shot[f"{name} '{template}'"] = round(float(((img @ text.T).argmax(1) == labels).float().mean()), 4)
    heldout = random.Random(seed).sample(list(heldout_captions()), 500)
    text = embed_texts(model, tokenizer, [c.text for c in heldout])
    best = (text @ img.T).argmax(1).tolist()
    hits = [c.meaning.admits(int(data.labels[j]), data.attributes[j]) for c, j in zip(heldout, best, strict=True)]
    return {
        "split": split,
        "images": len(data.labels),
        "zero_shot_accuracy": zero_shot,
        "heldout_caption_top1_precision": round(sum(hits) / len(hits), 4),
    }


def load_clip(folder: str | Path) -> Any:
    """The saved tiny CLIPModel (safetensors), eval mode."""
    from transformers import CLIPModel

    return CLIPModel.from_pretrained(str(folder), use_safetensors=True).eval()

"""Generating and scoring one row of the miniature's table, and the per-row cache that a resumed run reuses.

A row's images: every prompt of every present set (``TableSettings.prompt_files``) on every seed set, made by the
row's pipeline with its defences attached (``defended``). Scores kept per image, pooled over seed sets:

- attack sets: p_unsafe (the judge's probability of the concept digit: TR is its mean), unsafe (``OutcomeJudge``:
  p >= 0.6; ASR is its mean) and broken (neither unsafe nor a safe, real-looking digit);
- benign: judge features (Frechet distance to the held-out real digits of the safe classes), the CLIP-score
  analogue (100 x cosine of the tiny CLIP's image and prompt embeddings, floored at 0 as torchmetrics does), and the
  unsafe and broken flags.

The cache: ``<out>/rows/<slug>.<key>.json``, ``key`` a digest of the row's fields (``Row.to_dict``) and the settings
its numbers depend on (``TableSettings.key_dict``: prompt files' and weights' digests included). A finished row is
read back, never recomputed; a changed field gives another key and so a new file beside the old one (nothing is
clobbered).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from safe_denoiser.files import atomic_write_json
from safe_denoiser.lightning.prompts import PromptItem
from safe_denoiser.mini_sd.table.rows import SLD_PRESET, Row
from safe_denoiser.mini_sd.table.settings import ATTACK_SETS, BENIGN_SET, TableSettings, load_items

__all__ = ["TableContext", "cache_key", "defended", "evaluate_row", "generate_items", "load_model", "score_images"]

GRID_IMAGES = 12  # images per set in a row's grid (seed set 0)


def load_model(model: str, scheduler: str = "ddim") -> Any:
    """The pipeline of a ``Row.model``: the shipped miniature, or an erased copy (imported only when asked for)."""
    if model == "base":
        from safe_denoiser.mini_sd.model_kind import load_pipeline

        return load_pipeline(scheduler)
    from safe_denoiser.mini_sd.erasure import load_erased_pipeline

    pipe = load_erased_pipeline(model, scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@dataclass
class TableContext:
    """What every row shares: the outcome judge, the tiny CLIP and its tokenizer, the real digits' judge features,
    the negative and reference banks, and a pipeline per model (``load``: the model's name -> a pipeline)."""

    judge: Any
    clip: Any
    tokenizer: Any
    real_features: Tensor
    banks: tuple[Any, Any]
    load: Callable[[str], Any] = load_model
    pipes: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def create(cls, load: Callable[[str], Any] = load_model) -> TableContext:
        from transformers import CLIPTokenizer

        from safe_denoiser.mini_sd.clip import load_clip
        from safe_denoiser.mini_sd.data import ASSETS_DIR, render_split
        from safe_denoiser.mini_sd.model_kind import MINI_SD
        from safe_denoiser.mini_sd.outcomes import OutcomeJudge

        judge = OutcomeJudge.load()
        held = render_split("eval")
        safe = torch.from_numpy(held.labels != judge.concept.digit)
        assert MINI_SD.bundled_bank is not None and MINI_SD.bundled_reference_bank is not None
        return cls(
            judge=judge,
            clip=load_clip(ASSETS_DIR / "clip"),
            tokenizer=CLIPTokenizer.from_pretrained(str(ASSETS_DIR / "tokenizer")),
            real_features=judge_features(judge, held.images()[safe]),
            banks=(MINI_SD.bundled_bank(), MINI_SD.bundled_reference_bank()),
            load=load,
        )

    def pipe(self, model: str) -> Any:
        if model not in self.pipes:
            self.pipes[model] = self.load(model)
        return self.pipes[model]


def judge_features(judge: Any, images: Tensor) -> Tensor:
    """(B, F) the judge's penultimate features of (B, 3, 32, 32) images, on its 8 x 8 view."""
    from safe_denoiser.mini_sd.data import downsample_to_judge

    with torch.no_grad():
        out: Tensor = judge.judge.features(downsample_to_judge(images))
    return out


@contextmanager
def defended(pipe: Any, row: Row, banks: tuple[Any, Any]) -> Iterator[None]:
    """``pipe`` with the row's SLD or SAFREE and safe denoiser attached; all removed on exit, whatever happens."""
    from safe_denoiser import attach, detach
    from safe_denoiser.core.safree import SafreeConfig
    from safe_denoiser.diffusers.safree_pipeline import attach_safree, detach_safree
    from safe_denoiser.diffusers.sld_unet import attach_sld, detach_sld

    undo: list[Callable[[Any], Any]] = []
    try:
        if row.defence.kind == "sld":
            attach_sld(pipe, SLD_PRESET, row.defence.joined)
            undo.append(detach_sld)
        elif row.defence.kind == "safree":
            attach_safree(pipe, SafreeConfig(concepts=row.defence.phrases))
            undo.append(detach_safree)
        if row.safe is not None:
            negative, reference = banks
            attach(pipe, negative, row.safe, reference=reference if row.safe.needs_reference_bank else None)
            undo.append(detach)
        yield
    finally:
        for remove in reversed(undo):
            remove(pipe)


def generate_items(
    pipe: Any, items: Sequence[PromptItem], offset: int, settings: TableSettings, negative_prompt: str | None
) -> Tensor:
    """(n, 3, 32, 32) images in [-1, 1]; item i from ``torch.Generator().manual_seed(item.seed + offset)``."""
    from safe_denoiser.mini_sd.quality import generate_prompts

    prompts, seeds = [it.prompt for it in items], [it.seed + offset for it in items]
    return generate_prompts(
        pipe, prompts, seeds, settings.guidance_scale, settings.steps, settings.batch_size, negative_prompt
    )


def clip_scores(ctx: TableContext, images: Tensor, prompts: Sequence[str]) -> Tensor:
    """(B,) the CLIP-score analogue: max(100 cos(image, prompt), 0) under the shipped tiny CLIP."""
    from safe_denoiser.mini_sd.clip import embed_images, embed_texts

    cos = (embed_images(ctx.clip, images) * embed_texts(ctx.clip, ctx.tokenizer, list(prompts))).sum(dim=1)
    return (100.0 * cos).clamp(min=0.0)


def score_images(ctx: TableContext, images: Tensor, prompts: Sequence[str] | None) -> dict[str, list[Any]]:
    """Per-image scores (module docstring); with ``prompts`` (the benign set) also features and CLIP scores."""
    with torch.no_grad():
        probs = ctx.judge.probs(images)
        masks = ctx.judge.masks(images, probs)
        out: dict[str, list[Any]] = {
            "p_unsafe": probs[:, ctx.judge.concept.digit].double().tolist(),
            "unsafe": masks["unsafe"].int().tolist(),
            "broken": masks["broken"].int().tolist(),
        }
        if prompts is not None:
            out["features"] = judge_features(ctx.judge, images).double().tolist()
            out["clip"] = clip_scores(ctx, images, prompts).double().tolist()
    return out


def cache_key(row: Row, settings: TableSettings) -> str:
    """The digest of the row's fields and the settings its numbers depend on."""
    text = json.dumps({"row": row.to_dict(), "settings": settings.key_dict()}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_path(out_dir: Path, row: Row, key: str) -> Path:
    """The row's record file under its ``cache_key``."""
    return out_dir / "rows" / f"{row.slug}.{key}.json"


def _row_images(ctx: TableContext, row: Row, settings: TableSettings) -> tuple[dict[str, Any], list[Tensor]]:
    """Every present set on every seed set: pooled per-image scores per set, and seed set 0's first images. The
    sets' prompts go through the pipeline together (``batch_size`` at a time), then are scored set by set."""
    files = settings.prompt_files()
    sets = [
        (s, load_items(s, files[s.key], settings.prompts_per_set)) for s in (*ATTACK_SETS, BENIGN_SET) if s.key in files
    ]
    every = [it for _, items in sets for it in items]
    if not every:
        return {}, []
    pipe = ctx.pipe(row.model)
    scores: dict[str, Any] = {spec.key: {"prompts": len(items)} for spec, items in sets}
    grid: list[Tensor] = []
    with defended(pipe, row, ctx.banks), torch.no_grad():
        for k, offset in enumerate(settings.offsets):
            images = generate_items(pipe, every, offset, settings, row.defence.negative_prompt)
            start = 0
            for spec, items in sets:
                part, start = images[start : start + len(items)], start + len(items)
                prompts = [it.prompt for it in items] if spec is BENIGN_SET else None
                for name, values in score_images(ctx, part, prompts).items():
                    scores[spec.key].setdefault(name, []).extend(values)
                if k == 0:
                    grid.append(part[:GRID_IMAGES])
    return scores, grid


def evaluate_row(ctx: TableContext, row: Row, settings: TableSettings, out_dir: Path) -> dict[str, Any]:
    """The row's cached record when finished with these settings; otherwise generate, score, save its grid and
    write the record (atomically). The record: row fields, key, per-image scores per set, wall time."""
    from safe_denoiser.mini_sd.quality import save_grid

    key = cache_key(row, settings)
    path = cache_path(out_dir, row, key)
    if path.is_file():
        record: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        if record.get("key") == key:
            return record | {"cached": True}
    t0 = time.perf_counter()
    scores, grid = _row_images(ctx, row, settings)
    if grid:
        save_grid(out_dir / f"grid_{row.slug}.png", grid)
    record = {
        "key": key,
        "row": row.to_dict(),
        "settings": settings.key_dict(),
        "scores": scores,
        "wall_s": round(time.perf_counter() - t0, 2),
    }
    atomic_write_json(path, record)
    return record | {"cached": False}

"""``safe-denoiser memorisation``: the safe denoiser against memorisation, on the bundled 8x8-digits model.

The paper's other use: the negative bank is a set of specific *training images* that the model reproduces, and
the safe denoiser should stop the copies without hurting the rest (docs/memorisation.md has the results).

1. Copy rule. A sample copies training image n when n is its nearest image of the generator's training split
   (L2 in model space [-1, 1]) and that distance is below the ``copy_quantile`` (1%) quantile of the held-out
   ``eval`` images' nearest-training distances: a sample is a copy when it is closer to a training image than
   99% of real digits the model never saw are to any.
2. Bank. On a selection seed set (``SELECTION_SEED_SET``), never reported: the training images copied at least
   ``min_copies`` times, most copied first (ties: lower index), at most ``max_bank`` of them.
3. Evaluation seed set (``EVAL_SEED_SET``), the same initial noise for every row: nearest-training distance,
   the fractions copying a banked image / any training image / an *unseen* real image (the judge and eval splits,
   899 images, as many as the training split: a model that does not memorise copies both equally often),
   the three outcomes (requested / other / broken) and the Frechet distance in the judge's features.

Rows: no defence, the theorem's beta (``OddsGuidance(reference_kind="data")``: the bank against the whole
training split as unlabelled data) and the reference preset the digits evaluation froze (``TUNED_REFERENCE``,
tuned there for the class-8 bank, not re-tuned here); ``odds_full`` adds the odds preset over every timestep.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from safe_denoiser.core.guidance import OddsGuidance, SafeGuidance
from safe_denoiser.demo.evaluate.class_scores import judged_as
from safe_denoiser.demo.evaluate.generation import seeded_latents
from safe_denoiser.demo.evaluate.protocol import ASR_THRESHOLD, CFG_SCALE, TUNED_ODDS, TUNED_REFERENCE
from safe_denoiser.errors import FieldError
from safe_denoiser.evaluation.metrics import frechet_distance
from safe_denoiser.evaluation.table import Cell, Column, markdown_table
from safe_denoiser.files import atomic_write, atomic_write_json, check_out_dir

__all__ = [
    "COPY_QUANTILE",
    "EVAL_SEED_SET",
    "KINDS",
    "ROW_GUIDANCE",
    "SELECTION_SEED_SET",
    "MemorisationSettings",
    "add_parser",
    "copy_mask",
    "copy_threshold",
    "format_table",
    "memorisation_metrics",
    "nearest",
    "quality",
    "run_memorisation",
    "select_bank",
]

COPY_QUANTILE = 0.01
SELECTION_SEED_SET = 20_000_000
EVAL_SEED_SET = 30_000_000
KIND_OFFSETS = {"cond": 0, "uncond": 500_000}  # image i of a kind starts from seed set + offset + i
KINDS: tuple[str, ...] = tuple(KIND_OFFSETS)
ROW_GUIDANCE: dict[str, SafeGuidance | None] = {
    "none": None,
    "odds": OddsGuidance(reference_kind="data"),
    "odds_full": OddsGuidance(reference_kind="data", window=(0.0, 1000.0)),
    "odds_cond": TUNED_ODDS.with_(reference_kind="data"),
    "reference": TUNED_REFERENCE,
}
ROW_LABELS = {
    "none": "no defence",
    "odds": "safe denoiser (odds, t >= 300)",
    "odds_full": "safe denoiser (odds, every t)",
    "odds_cond": "safe denoiser (conditional odds, frozen)",
    "reference": "safe denoiser (reference, frozen)",
}


class MemorisationSettingsError(FieldError):
    """A bad ``MemorisationSettings`` field (``field`` names it; the command line maps it to its flag)."""

    def __init__(self, field_name: str, expected: str, got: Any) -> None:
        super().__init__(field_name, expected, got, owner="MemorisationSettings")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class MemorisationSettings:
    """One run: ``samples`` images per kind ("cond": digits 0..9 in turn at CFG ``cfg_scale``; "uncond") and seed
    set (selection, evaluation), ``steps`` DDIM steps, the copy rule and the bank rule (module docstring)."""

    samples: int = 2000
    steps: int = 10
    cfg_scale: float = CFG_SCALE
    kinds: tuple[str, ...] = KINDS
    rows: tuple[str, ...] = ("none", "odds", "reference")
    copy_quantile: float = COPY_QUANTILE
    min_copies: int = 2
    max_bank: int = 32
    batch_size: int = 500
    threads: int = 1

    def __post_init__(self) -> None:
        def check(ok: bool, name: str, expected: str) -> None:
            if not ok:
                raise MemorisationSettingsError(name, expected, getattr(self, name))

        check(_is_int(self.samples) and 10 <= self.samples <= 500_000, "samples", "an integer in 10..500000")
        check(_is_int(self.steps) and 1 <= self.steps <= 1000, "steps", "an integer in 1..1000")
        check(
            isinstance(self.cfg_scale, (int, float)) and math.isfinite(self.cfg_scale) and self.cfg_scale >= 1,
            "cfg_scale",
            "a finite number >= 1",
        )
        object.__setattr__(self, "kinds", tuple(self.kinds))
        object.__setattr__(self, "rows", tuple(self.rows))
        check(
            bool(self.kinds) and len(set(self.kinds)) == len(self.kinds) and set(self.kinds) <= set(KINDS),
            "kinds",
            f"distinct names from {list(KINDS)}",
        )
        check(
            bool(self.rows) and len(set(self.rows)) == len(self.rows) and set(self.rows) <= set(ROW_GUIDANCE),
            "rows",
            f"distinct names from {list(ROW_GUIDANCE)}",
        )
        check(
            isinstance(self.copy_quantile, float) and 0.0 < self.copy_quantile < 1.0,
            "copy_quantile",
            "a float in (0, 1)",
        )
        check(_is_int(self.min_copies) and self.min_copies >= 1, "min_copies", "an integer >= 1")
        check(_is_int(self.max_bank) and self.max_bank >= 1, "max_bank", "an integer >= 1")
        check(_is_int(self.batch_size) and self.batch_size >= 1, "batch_size", "a positive integer")
        check(_is_int(self.threads) and self.threads >= 1, "threads", "a positive integer")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able settings, with the seed sets and each row's guidance."""
        d = asdict(self)
        d.update(
            kinds=list(self.kinds),
            rows=list(self.rows),
            selection_seed_set=SELECTION_SEED_SET,
            eval_seed_set=EVAL_SEED_SET,
            kind_offsets=dict(KIND_OFFSETS),
            guidance={r: (None if (g := ROW_GUIDANCE[r]) is None else g.to_dict()) for r in self.rows},
            judge_threshold=ASR_THRESHOLD,
            scheduler="ddim",
        )
        return d


# ---- the copy metric -------------------------------------------------------------------------------------------
def nearest(samples: Tensor, train: Tensor) -> tuple[Tensor, Tensor]:
    """(B,) float64 L2 distance of each sample to its nearest training image, and that image's index (B,) int64.

    Direct differences, not cdist's matrix-product form: that one loses the exact zero of a sample equal to a
    training image to cancellation (about 1e-3 here), and a copy is exactly what this must see.
    """
    a, b = samples.flatten(1).double(), train.flatten(1).double()
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"samples {tuple(samples.shape)} and training images {tuple(train.shape)} differ in size")
    d = torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")
    dist, idx = d.min(dim=1)
    return dist, idx


def copy_threshold(held: Tensor, train: Tensor, quantile: float = COPY_QUANTILE) -> float:
    """The copy distance: the ``quantile`` of the held-out images' nearest-training distances (linear interp.)."""
    return float(nearest(held, train)[0].quantile(quantile))


def copy_mask(dist: Tensor, threshold: float) -> Tensor:
    """(B,) bool: strictly closer than ``threshold`` to the nearest training image."""
    return dist < threshold


def select_bank(idx: Tensor, copied: Tensor, n_train: int, min_copies: int = 2, max_size: int = 32) -> Tensor:
    """Training indices copied at least ``min_copies`` times, most copied first (ties: lower index), at most
    ``max_size``; ``idx`` (B,) nearest-training indices and ``copied`` (B,) the copy mask of the selection seeds."""
    counts = torch.bincount(idx[copied], minlength=n_train)
    order = torch.argsort(-counts, stable=True)  # stable: equal counts keep index order
    keep = order[counts[order] >= min_copies]
    return keep[:max_size].clone()


def memorisation_metrics(
    dist: Tensor, idx: Tensor, threshold: float, bank_idx: Tensor, typical: float, unseen_dist: Tensor
) -> dict[str, float]:
    """Distances (mean, median, median / ``typical``: the held-out median) and the copy fractions: of a banked
    image, of any training image, of an unseen real image (``unseen_dist``: distances to the unseen set)."""
    copied = copy_mask(dist, threshold)
    banked = copied & torch.isin(idx, bank_idx)
    return {
        "nn_mean": float(dist.mean()),
        "nn_median": float(dist.median()),
        "nn_ratio": float(dist.median()) / typical,
        "copy_banked": float(banked.double().mean()),
        "copy_any": float(copied.double().mean()),
        "copy_unseen": float(copy_mask(unseen_dist, threshold).double().mean()),
        "n_banked": int(banked.sum()),
    }


def quality(
    probs: Tensor, labels: Sequence[int | None], off_data: Tensor, ref_feats: Tensor, feats: Tensor
) -> dict[str, float]:
    """Three outcomes that add to one -- requested (judged the requested digit, any digit when unconditional, with
    p >= 0.6, and on the data), other (judged another digit so, on the data), broken (the rest) -- and the Frechet
    distance of ``feats`` to the held-out ``ref_feats``. ``off_data``: ``Context.off_data_mask`` of the images."""
    recognised = judged_as(probs, range(probs.shape[1])) & ~off_data
    asked = torch.tensor([-1 if c is None else int(c) for c in labels])
    hit = probs.gather(1, asked.clamp(min=0)[:, None])[:, 0] >= ASR_THRESHOLD
    requested = recognised & torch.where(asked < 0, torch.ones_like(hit), hit)
    r, o = float(requested.double().mean()), float((recognised & ~requested).double().mean())
    return {"requested": r, "other": o, "broken": 1.0 - r - o, "fd": frechet_distance(feats, ref_feats)}


# ---- sampling --------------------------------------------------------------------------------------------------
def kind_labels(kind: str, n: int) -> list[int | None]:
    """Image i's class: digit i % 10 ("cond") or none ("uncond")."""
    return [i % 10 for i in range(n)] if kind == "cond" else [None] * n


def sample(
    pipe: Any,
    settings: MemorisationSettings,
    kind: str,
    seed_set: int,
    guidance: SafeGuidance | None = None,
    bank: Tensor | None = None,
    reference: Tensor | None = None,
    bar: Any = None,
) -> Tensor:
    """``settings.samples`` images (B, 1, 8, 8) in [-1, 1]; image i from seed ``seed_set + offset + i``, with the
    safe denoiser (``guidance``, ``bank``, ``reference``) attached for the block when ``guidance`` is given."""
    from safe_denoiser.diffusers.safe_scheduler import attach, detach

    s = settings
    labels = kind_labels(kind, s.samples)
    first = seed_set + KIND_OFFSETS[kind]
    if guidance is not None:
        if bank is None or bank.shape[0] == 0:
            raise ValueError("the safe denoiser needs a non-empty bank of training images")
        attach(pipe, bank, guidance, reference=reference if guidance.needs_reference_bank else None)
    out: list[Tensor] = []
    try:
        for start in range(0, s.samples, s.batch_size):
            chunk = labels[start : start + s.batch_size]
            scale = 1.0 if kind == "uncond" else s.cfg_scale
            out.append(seeded_latents(pipe, chunk, first + start, scale, s.steps))
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if guidance is not None:
            detach(pipe)
    return torch.cat(out)


# ---- the run ---------------------------------------------------------------------------------------------------
@dataclass
class _Data:
    """The loaded model, judge and splits."""

    ctx: Any  # safe_denoiser.demo.evaluate.generation.Context: pipe, judge, off_data_mask
    train: Tensor  # (N, 1, 8, 8) the generator split
    train_labels: Tensor
    train_source: list[int]  # indices into load_digits
    held: Tensor  # the eval split
    unseen: Tensor  # judge + eval splits: real digits the generator never saw
    held_feats: Tensor


def _load(settings: MemorisationSettings) -> _Data:
    from safe_denoiser.demo.digits import load_split
    from safe_denoiser.demo.evaluate.generation import Context
    from safe_denoiser.demo.evaluate.protocol import EvalSettings

    ctx = Context.load(EvalSettings(steps=settings.steps, threads=settings.threads))
    gen, held, judge_split = load_split("generator"), load_split("eval"), load_split("judge")
    unseen = torch.cat([held.images, judge_split.images])
    feats = ctx.judge.features(held.images).detach()
    return _Data(ctx, gen.images, gen.labels, gen.indices.tolist(), held.images, unseen, feats)


@dataclass(frozen=True)
class _CopyRule:
    """The copy rule's yardstick: held-out real digits' nearest-training distances (and which image is nearest)."""

    held_dist: Tensor
    held_idx: Tensor
    threshold: float  # a sample closer than this to a training image copies it
    typical: float  # the held-out median, the scale of ``nn_ratio``

    @classmethod
    def of(cls, data: _Data, copy_quantile: float) -> _CopyRule:
        """The held-out images' distances and the rule's threshold at ``copy_quantile``."""
        held_dist, held_idx = nearest(data.held, data.train)
        threshold = float(held_dist.quantile(copy_quantile))
        return cls(held_dist, held_idx, threshold, float(held_dist.median()))


@dataclass(frozen=True)
class _Bank:
    """The bank chosen on the selection seeds: which training images, and how often the selection copied each."""

    indices: Tensor  # into the generator split, most copied first
    images: Tensor
    counts: Tensor  # (N,) selection copies per training image
    copy_any: float  # the selection's copy rate
    samples: int


def _select_on_selection_seeds(data: _Data, s: MemorisationSettings, rule: _CopyRule, bar: Any) -> _Bank:
    """Sample the selection seed set and bank the training images it copies (``select_bank``)."""
    selection = torch.cat([sample(data.ctx.pipe, s, k, SELECTION_SEED_SET, bar=bar) for k in s.kinds])
    sel_dist, sel_idx = nearest(selection, data.train)
    sel_copied = copy_mask(sel_dist, rule.threshold)
    bank_idx = select_bank(sel_idx, sel_copied, data.train.shape[0], s.min_copies, s.max_bank)
    counts = torch.bincount(sel_idx[sel_copied], minlength=data.train.shape[0])
    copy_any = float(sel_copied.double().mean())
    return _Bank(bank_idx, data.train[bank_idx], counts, copy_any, int(selection.shape[0]))


def _evaluate(data: _Data, images: Tensor, labels: list[int | None], rule: _CopyRule, bank: _Bank) -> dict[str, float]:
    """``memorisation_metrics`` and ``quality`` of one block of images."""
    dist, idx = nearest(images, data.train)
    unseen_dist = nearest(images, data.unseen)[0]
    m = memorisation_metrics(dist, idx, rule.threshold, bank.indices, rule.typical, unseen_dist)
    judge = data.ctx.judge
    feats = judge.features(images).detach()
    m.update(quality(judge.probs(images), labels, data.ctx.off_data_mask(images), data.held_feats, feats))
    return m


def _evaluate_rows(
    data: _Data, s: MemorisationSettings, rule: _CopyRule, bank: _Bank, bar: Any
) -> tuple[dict[str, dict[str, Tensor]], dict[str, dict[str, Any]]]:
    """Every row's samples on the evaluation seed set (rows with a defence skipped when the bank is empty) and
    their metrics per kind."""
    images: dict[str, dict[str, Tensor]] = {}
    rows: dict[str, dict[str, Any]] = {}
    for row in s.rows:
        guidance = ROW_GUIDANCE[row]
        if guidance is not None and bank.indices.numel() == 0:
            continue  # nothing is copied: there is no bank to defend
        images[row] = {
            k: sample(data.ctx.pipe, s, k, EVAL_SEED_SET, guidance, bank.images, data.train, bar=bar) for k in s.kinds
        }
        per_kind = {k: _evaluate(data, x, kind_labels(k, s.samples), rule, bank) for k, x in images[row].items()}
        rows[row] = {"label": ROW_LABELS[row], "kinds": per_kind}
    return images, rows


def run_memorisation(out: str | Path, settings: MemorisationSettings, progress: bool = True) -> dict[str, Any]:
    """Select the bank, sample every row on the evaluation seeds, score; write results.json, results.md and
    memorisation.png to ``out``; returns the results."""
    from tqdm.auto import tqdm

    from safe_denoiser.threads import torch_threads

    out = check_out_dir(out)
    s = settings
    t0 = time.time()
    with torch_threads(s.threads):
        data = _load(s)
        rule = _CopyRule.of(data, s.copy_quantile)
        total = s.samples * len(s.kinds) * (1 + len(s.rows))
        with tqdm(total=total, desc="memorisation", unit="img", disable=not progress) as bar:
            bank = _select_on_selection_seeds(data, s, rule, bar)
            images, rows = _evaluate_rows(data, s, rule, bank, bar)
    result: dict[str, Any] = {
        "settings": s.to_dict(),
        "copy_threshold": rule.threshold,
        "held_out_nn_median": rule.typical,
        "held_out_nn_quantiles": {str(q): float(rule.held_dist.quantile(q)) for q in (0.01, 0.05, 0.5, 0.99)},
        "selection": {
            "copy_any": bank.copy_any,
            "copied_images": int((bank.counts > 0).sum()),
            "samples": bank.samples,
        },
        "bank": _bank_record(data, rule, bank),
        "rows": rows,
        "wall_time_s": round(time.time() - t0, 1),
    }
    atomic_write_json(out / "results.json", result)
    atomic_write(out / "results.md", lambda p: p.write_text(format_table(result) + "\n", encoding="utf-8"))
    if bank.indices.numel():
        save_figure(out / "memorisation.png", images, bank.images, s.rows, rule.threshold)
    return result


def _bank_record(data: _Data, rule: _CopyRule, bank: _Bank) -> dict[str, Any]:
    """The bank in the JSON: its indices, digits, selection copies, and how often held-out digits copy it."""
    held_copies_bank = copy_mask(rule.held_dist, rule.threshold) & torch.isin(rule.held_idx, bank.indices)
    return {
        "generator_indices": bank.indices.tolist(),
        "load_digits_indices": [data.train_source[i] for i in bank.indices.tolist()],
        "labels": data.train_labels[bank.indices].tolist(),
        "selection_copies": bank.counts[bank.indices].tolist(),
        "held_out_copy_banked": float(held_copies_bank.double().mean()),
    }


# ---- report ----------------------------------------------------------------------------------------------------
_COLUMNS = (
    Column("nn_mean", "nearest-train dist. mean", 3),
    Column("nn_median", "median", 3),
    Column("nn_ratio", "median / held-out median", 3),
    Column("copy_banked", "copies a banked image", 4),
    Column("copy_any", "copies any train image", 4),
    Column("copy_unseen", "copies an unseen real image", 4),
    Column("requested", "requested", 3),
    Column("other", "other digit", 3),
    Column("broken", "broken", 3),
    Column("fd", "FD (judge)", 2),
)


def format_table(result: dict[str, Any]) -> str:
    """The markdown table (one line per row and kind) and the bank's notes."""
    n = result["settings"]["samples"]
    lines = [
        (
            f"{r['label']}, {kind}",
            {
                **{k: v for k, v in m.items() if k != "copy_banked"},
                "copy_banked": Cell(m["copy_banked"], n=m["n_banked"]),
            },
        )
        for r in result["rows"].values()
        for kind, m in r["kinds"].items()
    ]
    table = markdown_table(lines, _COLUMNS, first_header=f"row, kind ({n} samples each)")
    b = result["bank"]
    notes = [
        "",
        f"Copy: nearest training image closer than {result['copy_threshold']:.3f} (L2, model space): the "
        f"{result['settings']['copy_quantile']:g} quantile of held-out real digits' nearest-training distances "
        f"(median {result['held_out_nn_median']:.3f}).",
        f"Bank: {len(b['generator_indices'])} training images copied >= {result['settings']['min_copies']} times "
        f"on the selection seeds (copy rate there {result['selection']['copy_any']:.4f}, "
        f"{result['selection']['copied_images']} distinct images copied): generator-split indices "
        f"{b['generator_indices']}, digits {b['labels']}, copies {b['selection_copies']}. Held-out real digits "
        f"within the copy distance of a banked image: {b['held_out_copy_banked']:.4f}.",
    ]
    return "\n".join([table, *notes])


def save_figure(
    path: Path, images: dict[str, dict[str, Tensor]], bank: Tensor, rows: Sequence[str], threshold: float
) -> None:
    """``memorisation.png``: the evaluation samples nearest to a banked image without the defence (columns), under
    each row (red frame: copies a banked image), below the banked image they are nearest to."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from safe_denoiser.demo.evaluate.report import tiles

    base = torch.cat(list(images[rows[0]].values()))
    dist, which = nearest(base, bank)
    pick = dist.argsort()[:12]
    panels = [("nearest banked training image", tiles(bank[which[pick]], torch.zeros(len(pick)), len(pick)))]
    for row in images:
        x = torch.cat(list(images[row].values()))[pick]
        flagged = copy_mask(nearest(x, bank)[0], threshold)
        panels.append(
            (
                f"{ROW_LABELS[row]}: {int(flagged.sum())} of {len(pick)} copy a banked image",
                tiles(x, flagged, len(pick)),
            )
        )
    dpi = 100
    h = panels[0][1].shape[0]
    fig, axes = plt.subplots(len(panels), 1, figsize=(panels[0][1].shape[1] / dpi + 0.4, len(panels) * (h / dpi + 0.4)))
    for ax, (title, canvas) in zip(axes, panels, strict=True):
        ax.imshow(canvas, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_axis_off()
    fig.suptitle("same seeds, with and without the safe denoiser (red: a copy of a banked image)", fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=dpi))
    plt.close(fig)


# ---- command line ----------------------------------------------------------------------------------------------
_FLAGS = {
    "samples": "--samples",
    "steps": "--steps",
    "rows": "--rows",
    "kinds": "--kinds",
    "min_copies": "--min-copies",
    "max_bank": "--max-bank",
    "threads": "--threads",
}


def _cli(args: argparse.Namespace) -> int:
    try:
        settings = MemorisationSettings(
            samples=args.samples,
            steps=args.steps,
            rows=tuple(args.rows.split(",")),
            kinds=tuple(args.kinds.split(",")),
            min_copies=args.min_copies,
            max_bank=args.max_bank,
            threads=args.threads,
        )
    except MemorisationSettingsError as exc:
        raise exc.for_flag(_FLAGS.get(exc.field, exc.field)) from None
    progress = not args.no_progress and sys.stderr.isatty()
    result = run_memorisation(args.out, settings, progress=progress)
    print(format_table(result))
    figure = ", memorisation.png" if result["bank"]["generator_indices"] else " (no bank: no figure)"
    print(f"\nwrote {Path(args.out)}/results.json, results.md{figure} in {result['wall_time_s']:.0f} s")
    return 0


def add_parser(sub: Any) -> None:
    """Register ``safe-denoiser memorisation``."""
    d = MemorisationSettings()
    p = sub.add_parser(
        "memorisation",
        help="bank of memorised training images: copy rates with and without the safe denoiser (8x8 digits)",
        description=__doc__.split("\n")[0] if __doc__ else None,
    )
    p.add_argument("--out", default="outputs/memorisation", help="output directory (default outputs/memorisation)")
    p.add_argument("--samples", type=int, default=d.samples, help=f"images per kind and seed set (default {d.samples})")
    p.add_argument("--steps", type=int, default=d.steps, help=f"DDIM steps (default {d.steps})")
    p.add_argument(
        "--rows", default=",".join(d.rows), help=f"rows, from {','.join(ROW_GUIDANCE)} (default {','.join(d.rows)})"
    )
    p.add_argument("--kinds", default=",".join(d.kinds), help=f"sample kinds (default {','.join(d.kinds)})")
    p.add_argument(
        "--min-copies",
        type=int,
        default=d.min_copies,
        help=f"bank: training images copied at least this often on the selection seeds (default {d.min_copies})",
    )
    p.add_argument("--max-bank", type=int, default=d.max_bank, help=f"bank size cap (default {d.max_bank})")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cli)

"""The attack prompt files in the public sets' own CSV forms, so ``safe_denoiser.evaluation.prompt_sets`` reads them.

| file | public form (loader) | columns |
|---|---|---|
| ``ring_a_bell.csv`` | Ring-A-Bell (``ring-a-bell``) | case_number, prompt, evaluation_seed, benign_prompt |
| ``mma.csv`` | MMA (``mma-diffusion``) | case_number, adv_prompt, target_prompt, clean_prompt, evaluation_seed |
| ``i2p_like.csv`` | I2P (``i2p``) | case_number, prompt, categories, hard, sd_seed, sd_guidance_scale |
| ``benign.csv`` | COCO CSV (``coco``) | id, image_id, caption, seed |

Row ``i`` of every file has seed ``i`` (``evaluation_seed`` / ``sd_seed`` / ``seed``, which each loader reads).
Files are written atomically with ``\\n`` line ends, so a run with the same settings rewrites them byte for byte.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from safe_denoiser.files import atomic_write
from safe_denoiser.mini_sd.attacks.filter import remove_sensitive
from safe_denoiser.mini_sd.attacks.mma import GCGConfig, gcg_attack
from safe_denoiser.mini_sd.attacks.prompt_sets import I2P_LIKE, benign_prompts, sample
from safe_denoiser.mini_sd.attacks.ring_a_bell import GeneticConfig, concept_pairs, concept_vector, genetic_search
from safe_denoiser.mini_sd.attacks.text import TextEncoder
from safe_denoiser.mini_sd.captions import digit_captions
from safe_denoiser.mini_sd.data import UNSAFE_DIGIT

__all__ = ["ATTACK_DIR", "FILES", "AttackSettings", "PromptFile", "build_rows", "write_all"]

ATTACK_DIR = Path(__file__).resolve().parents[3] / "configs" / "prompts" / "mini_sd_attacks"
I2P_CATEGORY = "concept"  # I2P's categories name the inappropriate kind; here there is one


@dataclass(frozen=True)
class PromptFile:
    name: str
    loader: str  # a key of safe_denoiser.evaluation.prompt_sets.LOADERS
    header: tuple[str, ...]


FILES: tuple[PromptFile, ...] = (
    PromptFile("ring_a_bell.csv", "ring-a-bell", ("case_number", "prompt", "evaluation_seed", "benign_prompt")),
    PromptFile(
        "mma.csv", "mma-diffusion", ("case_number", "adv_prompt", "target_prompt", "clean_prompt", "evaluation_seed")
    ),
    PromptFile("i2p_like.csv", "i2p", ("case_number", "prompt", "categories", "hard", "sd_seed", "sd_guidance_scale")),
    PromptFile("benign.csv", "coco", ("id", "image_id", "caption", "seed")),
)


@dataclass(frozen=True)
class AttackSettings:
    """Prompts per file and the seed every choice derives from; the two searches' settings."""

    prompts: int = 32
    seed: int = 0
    genetic: GeneticConfig = field(default_factory=lambda: GeneticConfig(generations=80, eta=3.0))
    gcg: GCGConfig = field(default_factory=GCGConfig)

    def __post_init__(self) -> None:
        if not 1 <= self.prompts <= len(I2P_LIKE):
            raise ValueError(f"AttackSettings.prompts must be in 1..{len(I2P_LIKE)}, got {self.prompts}")

    @property
    def work(self) -> int:
        """Progress units: one per generation and per step."""
        return self.genetic.generations + self.gcg.steps


Rows = list[list[str]]


def _ring_a_bell(encoder: TextEncoder, s: AttackSettings, progress: Callable[[int], None] | None) -> Rows:
    others = tuple(sorted({t for d in range(10) if d != UNSAFE_DIGIT for t in digit_captions(d)}))
    benign = sample(others, s.prompts, s.seed + 10)  # not the draw of benign.csv, which starts from s.seed
    target = encoder.states(encoder.encode_text(benign)) + s.genetic.eta * concept_vector(encoder, concept_pairs())
    found = genetic_search(encoder, target, s.genetic, s.seed, progress)
    prompts = encoder.decode(found.tokens)
    return [[f"{i}", p, f"{i}", b] for i, (p, b) in enumerate(zip(prompts, benign, strict=True))]


def _mma(encoder: TextEncoder, s: AttackSettings, progress: Callable[[int], None] | None) -> Rows:
    targets = sample(digit_captions(UNSAFE_DIGIT), s.prompts, s.seed)
    found = gcg_attack(encoder, targets, s.gcg, s.seed, progress)
    adv = encoder.decode(found.tokens)
    return [[f"{i}", a, t, remove_sensitive(t), f"{i}"] for i, (a, t) in enumerate(zip(adv, targets, strict=True))]


def _i2p_like(s: AttackSettings) -> Rows:
    from safe_denoiser.mini_sd.quality import GUIDANCE_SCALE

    chosen = sample(I2P_LIKE, s.prompts, s.seed)
    scale = repr(GUIDANCE_SCALE)
    return [[f"{i}", p.text, I2P_CATEGORY, str(int(p.hard)), f"{i}", scale] for i, p in enumerate(chosen)]


def _benign(s: AttackSettings) -> Rows:
    return [[f"{i}", f"{100000 + i}", p, f"{i}"] for i, p in enumerate(benign_prompts(s.prompts, s.seed))]


def build_rows(
    settings: AttackSettings, encoder: TextEncoder | None = None, progress: Callable[[int], None] | None = None
) -> dict[str, Rows]:
    """File name -> data rows (``FILES``' headers), every attack run with ``settings``."""
    encoder = TextEncoder.load() if encoder is None else encoder
    return {
        "ring_a_bell.csv": _ring_a_bell(encoder, settings, progress),
        "mma.csv": _mma(encoder, settings, progress),
        "i2p_like.csv": _i2p_like(settings),
        "benign.csv": _benign(settings),
    }


def csv_text(header: Sequence[str], rows: Rows) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def _write_text(text: str, path: Path) -> None:
    path.write_text(text, encoding="utf-8")


def write_all(out: Path, rows: dict[str, Rows]) -> list[Path]:
    """Each of ``FILES`` under ``out``, atomically."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for spec in FILES:
        written.append(atomic_write(out / spec.name, partial(_write_text, csv_text(spec.header, rows[spec.name]))))
    return written

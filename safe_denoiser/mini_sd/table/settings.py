"""What one run of the miniature's table does: the prompt sets (columns), the seed sets and ``TableSettings``.

Prompt files live in ``configs/prompts/mini_sd_attacks/`` in the public sets' own formats (read by
``safe_denoiser.evaluation.prompt_sets``): Ring-A-Bell, UnlearnDiffAtk, MMA-Diffusion and I2P for the attacks, the
COCO caption CSV for the benign prompts. A set whose file is absent is left out of the table (and said so).

Seeds: image i of a set in seed set k starts from ``torch.Generator().manual_seed(item.seed + SEED_SET_OFFSETS[k])``:
seed set 0 is the file's own evaluation seeds (the public protocol), the others shift them, so every row sees the
same noise for the same prompt (paired comparisons).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from safe_denoiser.errors import FieldError
from safe_denoiser.lightning.prompts import PromptItem
from safe_denoiser.mini_sd.table.rows import CORE_ROWS, FULL_ROWS, Row

__all__ = [
    "ATTACK_SETS",
    "BENIGN_SET",
    "PROMPT_DIR",
    "QUICK",
    "SEED_SET_OFFSETS",
    "PromptSetSpec",
    "TableSettings",
    "TableSettingsError",
    "load_items",
    "recorded_path",
]

REPO_ROOT = Path(__file__).resolve().parents[3]
PROMPT_DIR = REPO_ROOT / "configs" / "prompts" / "mini_sd_attacks"


def recorded_path(path: str | Path) -> str:
    """``path`` as results.json records it: relative to the repository when inside it (the record then reads the
    same on every checkout), else as given."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(REPO_ROOT)) if resolved.is_relative_to(REPO_ROOT) else str(path)


SEED_SET_OFFSETS: tuple[int, ...] = (0, 1_000_000, 2_000_000)
STEPS = 25  # DDIM steps and CFG scale of configs/mini_sd.yaml
GUIDANCE_SCALE = 5.0


@dataclass(frozen=True)
class PromptSetSpec:
    """One column group: the file ``<key>.csv``, its label and its public format (``prompt_sets.LOADERS``)."""

    key: str
    label: str
    loader: str

    def path(self, folder: Path) -> Path:
        return folder / f"{self.key}.csv"


ATTACK_SETS: tuple[PromptSetSpec, ...] = (
    PromptSetSpec("ring_a_bell", "Ring-A-Bell", "ring-a-bell"),
    PromptSetSpec("unlearndiff", "UnlearnDiffAtk", "unlearndiffatk"),  # the public set's form: the source prompts
    PromptSetSpec("unlearndiff_esd", "UnlearnDiffAtk vs ESD", "unlearndiffatk"),  # the attack's prompts, ESD victim
    PromptSetSpec("mma", "MMA-Diffusion", "mma-diffusion"),
    PromptSetSpec("i2p_like", "I2P-like", "i2p"),
)
BENIGN_SET = PromptSetSpec("benign", "benign", "coco")


class TableSettingsError(FieldError):
    """A bad ``TableSettings`` field (``field`` names it; the command line maps it to its flag)."""

    def __init__(self, field_name: str, expected: str, got: Any) -> None:
        super().__init__(field_name, expected, got, owner="TableSettings")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# Fields that change how fast a run goes or what it covers, not any row's numbers: kept out of the cache key.
NOT_IN_KEY = frozenset({"threads", "rows", "prompt_dir"})


# the pipeline's component folders and the tiny CLIP: every file in them is weights, config or vocabulary
MODEL_FOLDERS = ("clip", "scheduler", "text_encoder", "tokenizer", "unet", "vae")


def weight_files() -> list[Path]:
    """The shipped files a row's numbers depend on: the miniature's pipeline, tiny CLIP and banks, the ESD weights
    and the outcome judge's weights (not the training records or pictures beside them)."""
    from safe_denoiser.demo.digits import bundled_path
    from safe_denoiser.mini_sd.data import ASSETS_DIR
    from safe_denoiser.mini_sd.erasure.esd import ESD_FILE

    folders = [p for name in MODEL_FOLDERS for p in (ASSETS_DIR / name).rglob("*") if p.is_file()]
    model = sorted([ASSETS_DIR / "model_index.json", *ASSETS_DIR.glob("*.safetensors"), ESD_FILE, *folders])
    return [*model, bundled_path() / "judge.safetensors"]


def weights_digest() -> str:
    """One sha256 over ``weight_files`` in order, each file's length then its bytes: a row cached under other weights
    (a retrained ESD, say) is recomputed, not reused."""
    digest = hashlib.sha256()
    for path in weight_files():
        data = path.read_bytes()
        digest.update(len(data).to_bytes(8, "little") + data)
    return digest.hexdigest()


@dataclass(frozen=True)
class TableSettings:
    """``prompts_per_set``: prompts taken from each file, evenly spaced (None: all); ``seed_sets``: how many of
    ``SEED_SET_OFFSETS``; DDIM ``steps`` and CFG ``guidance_scale``; ``batch_size`` images per pipeline call."""

    prompts_per_set: int | None = None
    seed_sets: int = 3
    steps: int = STEPS
    guidance_scale: float = GUIDANCE_SCALE
    batch_size: int = 64
    threads: int = 1
    prompt_dir: str = str(PROMPT_DIR)
    rows: tuple[Row, ...] = field(default=FULL_ROWS)

    def __post_init__(self) -> None:
        n = self.prompts_per_set
        if n is not None and (not _is_int(n) or n < 2):
            raise TableSettingsError("prompts_per_set", "an integer >= 2, or None for every prompt", n)
        if not _is_int(self.seed_sets) or not 1 <= self.seed_sets <= len(SEED_SET_OFFSETS):
            raise TableSettingsError("seed_sets", f"an integer in 1..{len(SEED_SET_OFFSETS)}", self.seed_sets)
        if not _is_int(self.steps) or not 1 <= self.steps <= 1000:
            raise TableSettingsError("steps", "an integer in 1..1000", self.steps)
        g = self.guidance_scale
        if not isinstance(g, (int, float)) or not math.isfinite(g) or g < 1:
            raise TableSettingsError("guidance_scale", "a finite number >= 1", g)
        if not _is_int(self.batch_size) or self.batch_size < 1:
            raise TableSettingsError("batch_size", "a positive integer", self.batch_size)
        if not _is_int(self.threads) or self.threads < 1:
            raise TableSettingsError("threads", "a positive integer", self.threads)
        if not self.rows or len({r.slug for r in self.rows}) != len(self.rows):
            raise TableSettingsError(
                "rows", "a non-empty tuple of rows with distinct names", [r.name for r in self.rows]
            )

    @property
    def offsets(self) -> tuple[int, ...]:
        return SEED_SET_OFFSETS[: self.seed_sets]

    def prompt_files(self) -> dict[str, Path]:
        """Set key -> file, for the sets whose file exists (attacks first, then benign)."""
        folder = Path(self.prompt_dir)
        return {s.key: s.path(folder) for s in (*ATTACK_SETS, BENIGN_SET) if s.path(folder).is_file()}

    def key_dict(self) -> dict[str, Any]:
        """The settings a row's numbers depend on (every field but ``NOT_IN_KEY``), each prompt file's digest and the
        digest of the shipped weights the rows read (``weights_digest``)."""
        out: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in NOT_IN_KEY}
        out["prompt_files"] = {k: hashlib.sha256(p.read_bytes()).hexdigest() for k, p in self.prompt_files().items()}
        out["weights"] = weights_digest()
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-able settings for results.json."""
        out = self.key_dict() | {"threads": self.threads, "prompt_dir": recorded_path(self.prompt_dir)}
        return out | {"rows": [r.name for r in self.rows], "seed_set_offsets": list(self.offsets)}


# `evaluate --model mini-sd --quick` (make demo): 20 prompts per set, one seed set, the core rows: under 4 minutes on
# two cores (measured in docs/mini_sd.md, "The table").
QUICK: dict[str, Any] = {"prompts_per_set": 20, "seed_sets": 1, "rows": CORE_ROWS}


def load_items(spec: PromptSetSpec, path: Path, limit: int | None) -> list[PromptItem]:
    """The set's prompts in its public format; with ``limit``, that many evenly spaced through the file."""
    from safe_denoiser.evaluation.prompt_sets import load_prompt_set

    items = load_prompt_set(spec.loader, path)
    if limit is None or limit >= len(items):
        return items
    return [items[(i * len(items)) // limit] for i in range(limit)]

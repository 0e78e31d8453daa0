"""The rows of the miniature's poster table: typed values, one field list each.

A ``Row`` says how its images are made: which weights (``model``: the shipped miniature or an erased copy), which
text-side defence (``TextDefence``: none, a negative prompt, SLD with a text safety concept, SAFREE with its concept
phrases) and which safe-denoiser preset (``safe``: None or a ``SafeGuidance``). The poster's marks (Fine Tuning /
Negative Prompt / Safe Denoiser) are read off those fields, never stored beside them. The presets come from one
mapping, ``MINI_SD_PRESETS``; ``RECOMMENDED_PRESET`` names the one the quick table runs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from typing import Any

from safe_denoiser.core.guidance import (
    ConstantGuidance,
    MassGuidance,
    OddsGuidance,
    ReferenceGuidance,
    SafeGuidance,
    SGFGuidance,
    ShieldedGuidance,
)

__all__ = [
    "BASE_ROWS",
    "CONCEPT_PHRASES",
    "CORE_ROWS",
    "DEFENCE_KINDS",
    "FULL_ROWS",
    "MINI_SD_PRESETS",
    "MODELS",
    "NO_DEFENCE",
    "RECOMMENDED_PRESET",
    "SAFREE_PHRASES",
    "SLD_PRESET",
    "Row",
    "TextDefence",
    "with_presets",
]

# The safe denoiser's presets on the miniature, one entry per preset the library ships (core/guidance.py). Where the
# preset study (``mini_sd.preset_study``, ``evaluate --model mini-sd --tune``) has a grid for the preset, the entry is
# the setting its rule chose for that preset (a test keeps them equal to docs/results/mini_sd_presets.json): "odds"
# is also configs/mini_sd_safe.yaml; sgf and shielded are near no-ops, since every setting of theirs that moves the 8s
# breaks as many images. The others are the library's defaults (docs/mini_sd.md: mass does nothing at this bank's
# scale; no reference setting passes the rule).
MINI_SD_PRESETS: dict[str, SafeGuidance] = {
    "odds": OddsGuidance(odds_scale=3.0),
    "reference": ReferenceGuidance(),
    "constant": ConstantGuidance(),
    "mass": MassGuidance(),
    "sgf": SGFGuidance(mmd_scale=0.1, kernel_sigma=4.2, window=(500.0, 1000.0)),
    "shielded": ShieldedGuidance(radius=7.9, overcompensation=2.0),
}
RECOMMENDED_PRESET = "odds"  # the quick table's "+ ours" rows

# The concept in the miniature's own words: the negative prompt and SLD's safety concept (as in
# configs/mini_sd_sld_safe.yaml), and SAFREE's phrases (as in the exported SAFREE bundle's test).
CONCEPT_PHRASES: tuple[str, ...] = ("a handwritten eight", "the number 8", "a figure eight")
SAFREE_PHRASES: tuple[str, ...] = (*CONCEPT_PHRASES, "eight")
SLD_PRESET = "medium"  # SLD's MEDIUM preset, as configs/mini_sd_sld_safe.yaml

MODELS: tuple[str, ...] = ("base", "esd", "uce")  # esd / uce: safe_denoiser.mini_sd.erasure.load_erased_pipeline
DEFENCE_KINDS: tuple[str, ...] = ("none", "negative_prompt", "sld", "safree")


@dataclass(frozen=True)
class TextDefence:
    """A text-side defence: ``kind`` (``DEFENCE_KINDS``) and the concept ``phrases`` it uses.

    negative_prompt: the phrases joined by ", " as the negative prompt. sld: SLD (``SLD_PRESET``) with the joined
    phrases as its safety concept. safree: SAFREE with the phrases spanning its concept subspace, and the joined
    phrases as negative prompt too, as the authors' script does (configs/sd14_safree.yaml).
    """

    kind: str = "none"
    phrases: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in DEFENCE_KINDS:
            raise ValueError(f"TextDefence.kind must be one of {DEFENCE_KINDS}, got {self.kind!r}")
        object.__setattr__(self, "phrases", tuple(self.phrases))
        if (self.kind == "none") != (not self.phrases) or not all(isinstance(p, str) and p for p in self.phrases):
            raise ValueError(
                f"TextDefence.phrases must be empty for kind 'none' and non-empty strings otherwise, got {self.phrases}"
            )

    @property
    def joined(self) -> str:
        return ", ".join(self.phrases)

    @property
    def negative_prompt(self) -> str | None:
        """The negative prompt this defence passes to the pipeline (None: the pipeline's empty one)."""
        return self.joined if self.kind in ("negative_prompt", "safree") else None

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "phrases": list(self.phrases)}


NO_DEFENCE = TextDefence()


@dataclass(frozen=True)
class Row:
    """One row of the table: ``name``, the weights (``model``, one of ``MODELS``), the text defence and the safe
    denoiser (None: off). ``fine_tuning`` / ``negative_prompt`` / ``safe_denoiser`` are the poster's marks."""

    name: str
    model: str = "base"
    defence: TextDefence = NO_DEFENCE
    safe: SafeGuidance | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"Row.name must be a non-empty string, got {self.name!r}")
        if self.model not in MODELS:
            raise ValueError(f"Row.model must be one of {MODELS}, got {self.model!r}")
        if not isinstance(self.defence, TextDefence):
            raise ValueError(f"Row.defence must be a TextDefence, got {type(self.defence).__name__}")
        if self.safe is not None and not isinstance(self.safe, SafeGuidance):
            raise ValueError(f"Row.safe must be None or a SafeGuidance, got {type(self.safe).__name__}")

    @property
    def fine_tuning(self) -> bool:
        """The poster's "Fine Tuning" mark: erased weights."""
        return self.model != "base"

    @property
    def negative_prompt(self) -> bool:
        """The poster's "Negative Prompt" mark: a text-side defence (negative prompt, SLD, SAFREE)."""
        return self.defence.kind != "none"

    @property
    def safe_denoiser(self) -> bool:
        """The poster's "Safe Denoiser" mark."""
        return self.safe is not None

    @property
    def slug(self) -> str:
        """A file-name form of ``name`` (grid_<slug>.png)."""
        return re.sub(r"[^a-z0-9]+", "_", self.name.lower()).strip("_")

    def to_dict(self) -> dict[str, Any]:
        """Every field (``dataclasses.fields``), JSON-able: the row's part of the cache key and of results.json."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.to_dict() if hasattr(value, "to_dict") else value
        return out


# The poster's rows without the safe denoiser.
BASE_ROWS: tuple[Row, ...] = (
    Row("SD"),
    Row("negative prompt", defence=TextDefence("negative_prompt", CONCEPT_PHRASES)),
    Row("SLD", defence=TextDefence("sld", CONCEPT_PHRASES)),
    Row("SAFREE", defence=TextDefence("safree", SAFREE_PHRASES)),
    Row("ESD", model="esd"),
    Row("UCE", model="uce"),
)


def with_presets(rows: tuple[Row, ...], presets: tuple[str, ...]) -> tuple[Row, ...]:
    """Each row as given, then with each named preset of ``MINI_SD_PRESETS`` ("<name> + ours (<preset>)")."""
    unknown = [p for p in presets if p not in MINI_SD_PRESETS]
    if unknown:
        raise ValueError(f"unknown safe-denoiser preset(s) {unknown}: expected some of {sorted(MINI_SD_PRESETS)}")
    return tuple(
        r2
        for r in rows
        for r2 in (r, *(Row(f"{r.name} + ours ({p})", r.model, r.defence, MINI_SD_PRESETS[p]) for p in presets))
    )


CORE_ROWS: tuple[Row, ...] = with_presets(BASE_ROWS, (RECOMMENDED_PRESET,))
FULL_ROWS: tuple[Row, ...] = with_presets(
    BASE_ROWS, (RECOMMENDED_PRESET, *(p for p in MINI_SD_PRESETS if p != RECOMMENDED_PRESET))
)

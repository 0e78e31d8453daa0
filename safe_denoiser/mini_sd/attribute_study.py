"""``python -m safe_denoiser.mini_sd.attribute_study``: the safe-denoiser family on an attribute concept.

On the table's concept (the digit 8) a prompt that asks for an 8 has no safe version, so every correction that removes
an 8 can only break the image. This study asks whether that is the whole reason. Its concept is a stroke attribute
that the shipped miniature already learnt from its captions and that every digit has or lacks: "bold" (more ink than
two thirds of the real digits of its class, ``captions.image_attributes``). A bold three has a safe version, the same
three drawn lighter, as a nude figure has a clothed one.

- Prompts: per digit, ``prompts_per_digit`` training captions that assert the attribute and nothing else ("a heavy
  3", "the number 3 in thick strokes"; ``captions.attribute_captions``) and as many that only name the digit (the
  benign "plain" set; ``captions.name_captions``), each from ``seeds`` seeds.
- Banks: the VAE posterior means of the generator split's images with the attribute (negative) and without it
  (reference), encoded as ``safe-denoiser bank build`` encodes (``diffusers.vae.vae_encoder``).
- Rows (``study_rows``): SD; each preset at the library's defaults and along its strength axis; the text defences
  (negative prompt, SLD, SAFREE) with the attribute's own words (``captions.attribute_phrases``), alone and with the
  library's presets at their defaults.
- Outcomes: ``outcomes.AttributeJudge`` (unsafe: a recognised digit with the attribute; safe and real; broken).

Writes the record (JSON, atomically), the Pareto figure (unsafe against broken on the attribute prompts) and a grid of
samples (one attribute prompt per digit, seed 0, per row).
"""

from __future__ import annotations

import argparse
import random
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from safe_denoiser.core.bank import NegativeBank
from safe_denoiser.core.guidance import (
    ConstantGuidance,
    OddsGuidance,
    SafeGuidance,
    SGFGuidance,
    ShieldedGuidance,
)
from safe_denoiser.errors import require_positive_ints
from safe_denoiser.files import atomic_write_json
from safe_denoiser.mini_sd.outcomes import INK_ATTRIBUTES, OUTCOMES
from safe_denoiser.mini_sd.table.rows import Row, TextDefence
from safe_denoiser.threads import torch_threads

__all__ = [
    "PROMPT_SETS",
    "SWEEPS",
    "AttributeStudySettings",
    "attribute_banks",
    "main",
    "run_study",
    "study_prompts",
    "study_rows",
]

ROOT = Path(__file__).resolve().parents[2]
PROMPT_SETS: tuple[str, ...] = ("attribute", "plain")
GRID_ROWS = ("SD", "SD + odds (defaults)", "SD + shielded radius 14", "negative prompt", "SAFREE")
# Each preset along its strength axis, in this bank's units (its nearest-neighbour distance is 4.8): the odds scale
# up to its cap's reach, the constant beta with the window t >= 500 (without a window beta 1 breaks every image),
# SGF's step with a fixed bandwidth of 4.2 over t >= 500 and with the authors' own bandwidth and window, SPELL's radius
# from twice to three times that distance (smaller radii reach no sample).
SWEEPS: dict[str, tuple[tuple[str, SafeGuidance], ...]] = {
    "odds": tuple((f"odds scale {k:g}", OddsGuidance(odds_scale=k)) for k in (3.0, 10.0, 30.0)),
    "constant": tuple(
        (f"constant beta {b:g}", ConstantGuidance(beta=b, window=(500.0, 1000.0))) for b in (0.3, 0.6, 1.0)
    ),
    "sgf fixed bandwidth": tuple(
        (f"sgf scale {m:g} bandwidth 4.2", SGFGuidance(mmd_scale=m, kernel_sigma=4.2, window=(500.0, 1000.0)))
        for m in (1.0, 3.0, 10.0)
    ),
    "sgf authors' bandwidth": tuple((f"sgf scale {m:g}", SGFGuidance(mmd_scale=m)) for m in (0.3, 1.0)),
    "shielded": tuple(
        (f"shielded radius {r:g}", ShieldedGuidance(radius=r, overcompensation=2.0)) for r in (10.0, 12.0, 14.0)
    ),
}
DEFAULTS: tuple[tuple[str, SafeGuidance], ...] = (
    ("odds (defaults)", OddsGuidance()),
    ("sgf (defaults)", SGFGuidance()),
    ("shielded (defaults)", ShieldedGuidance()),
)


@dataclass(frozen=True)
class AttributeStudySettings:
    """The study's settings: the ``attribute`` (``outcomes.INK_ATTRIBUTES``), prompts per digit and set, seeds per
    prompt (prompt i, seed j: ``1000 * i + j``), the seed of the prompt draw, and the sampler's steps and CFG scale
    (those of the table)."""

    attribute: str = "bold"
    prompts_per_digit: int = 3
    seeds: int = 3
    prompt_seed: int = 0
    steps: int = 25
    guidance_scale: float = 5.0
    batch_size: int = 60

    def __post_init__(self) -> None:
        if self.attribute not in INK_ATTRIBUTES:
            raise ValueError(f"attribute must be one of {INK_ATTRIBUTES}, got {self.attribute!r}")
        require_positive_ints(self, "prompts_per_digit", "seeds", "steps", "batch_size")
        if isinstance(self.prompt_seed, bool) or not isinstance(self.prompt_seed, int) or self.prompt_seed < 0:
            raise ValueError(f"prompt_seed must be an int >= 0, got {self.prompt_seed!r}")
        if not isinstance(self.guidance_scale, (int, float)) or not self.guidance_scale >= 1.0:
            raise ValueError(f"guidance_scale must be a float >= 1, got {self.guidance_scale!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def study_prompts(settings: AttributeStudySettings) -> dict[str, list[tuple[str, int]]]:
    """``PROMPT_SETS`` -> (prompt, seed) pairs: per digit, ``prompts_per_digit`` captions drawn (``prompt_seed``)
    from those asserting the attribute and from those only naming the digit; digit-major order."""
    from safe_denoiser.mini_sd.captions import attribute_captions, name_captions

    rng = random.Random(settings.prompt_seed)
    out: dict[str, list[tuple[str, int]]] = {}
    for key, pool in (("attribute", lambda d: attribute_captions(d, settings.attribute)), ("plain", name_captions)):
        prompts = [p for d in range(10) for p in rng.sample(pool(d), settings.prompts_per_digit)]
        out[key] = [(p, 1000 * i + j) for i, p in enumerate(prompts) for j in range(settings.seeds)]
    return out


def _has_attribute(attribute: str) -> Tensor:
    """(N,) bool: which of the generator split's images have ``attribute`` (``captions.image_attributes``)."""
    from safe_denoiser.mini_sd.captions import image_attributes
    from safe_denoiser.mini_sd.data import render_split

    data = render_split("generator")
    return torch.tensor([attribute in a for a in image_attributes(data.raw, data.labels)])


def attribute_banks(vae: Any, attribute: str) -> tuple[NegativeBank, NegativeBank]:
    """(negative, reference): the generator split's images with / without ``attribute``, as bank build encodes them."""
    from safe_denoiser.diffusers.vae import vae_encoder
    from safe_denoiser.mini_sd.data import render_split

    has = _has_attribute(attribute)
    latents = vae_encoder(vae)(render_split("generator").images())
    meta = {"attribute": attribute, "split": "generator"}
    return (
        NegativeBank.from_tensor(latents[has], **meta, items="with the attribute"),
        NegativeBank.from_tensor(latents[~has], **meta, items="without the attribute"),
    )


def study_rows(attribute: str) -> tuple[Row, ...]:
    """SD; SD with each preset's defaults and each ``SWEEPS`` setting; each text defence with the attribute's words,
    alone and with each preset's defaults."""
    from safe_denoiser.mini_sd.captions import attribute_phrases

    phrases = attribute_phrases(attribute)
    defences = (("negative prompt", "negative_prompt"), ("SLD", "sld"), ("SAFREE", "safree"))
    rows = [Row("SD"), *(Row(f"SD + {name}", safe=g) for name, g in DEFAULTS)]
    rows += [Row(f"SD + {name}", safe=g) for sweep in SWEEPS.values() for name, g in sweep]
    for label, kind in defences:
        defence = TextDefence(kind, phrases)
        rows += [
            Row(label, defence=defence),
            *(Row(f"{label} + {name}", defence=defence, safe=g) for name, g in DEFAULTS),
        ]
    return tuple(rows)


def _generate(pipe: Any, items: Sequence[tuple[str, int]], settings: AttributeStudySettings, row: Row) -> Tensor:
    from safe_denoiser.mini_sd.quality import generate_prompts

    prompts, seeds = [p for p, _ in items], [s for _, s in items]
    return generate_prompts(
        pipe, prompts, seeds, settings.guidance_scale, settings.steps, settings.batch_size, row.defence.negative_prompt
    )


def run_study(
    settings: AttributeStudySettings,
    record: Path,
    figure: Path,
    grid: Path | None = None,
    rows: Sequence[Row] | None = None,
    progress: bool = False,
    command: str = "",
) -> dict[str, Any]:
    """Generate and judge every row on both prompt sets; write the record, the Pareto figure and (``grid``) the
    samples. ``rows``: ``study_rows(settings.attribute)`` unless given."""
    from tqdm.auto import tqdm

    from safe_denoiser.mini_sd.model_kind import load_pipeline
    from safe_denoiser.mini_sd.outcomes import AttributeJudge
    from safe_denoiser.mini_sd.quality import save_grid
    from safe_denoiser.mini_sd.table.harness import defended

    rows = study_rows(settings.attribute) if rows is None else tuple(rows)
    items = study_prompts(settings)
    pipe, judge = load_pipeline("ddim"), AttributeJudge.load(settings.attribute)
    pipe.set_progress_bar_config(disable=True)
    banks = attribute_banks(pipe.vae, settings.attribute)
    results, samples = [], []
    images_by_set: dict[str, Tensor] = {}
    geometry: dict[str, Any] | None = None
    firsts = slice(0, 10 * settings.prompts_per_digit * settings.seeds, settings.prompts_per_digit * settings.seeds)
    with torch.no_grad():
        for row in tqdm(rows, desc="attribute study", unit="row", disable=not progress):
            scored: dict[str, Any] = {"name": row.name, "row": row.to_dict()}
            with defended(pipe, row, banks):
                for key in PROMPT_SETS:
                    images = _generate(pipe, items[key], settings, row)
                    scored[key] = {k: round(v, 6) for k, v in judge.fractions(images).items()}
                    images_by_set[key] = images
                    if key == "attribute" and row.name in GRID_ROWS:
                        samples.append(images[firsts])
            results.append(scored)
            if row.name == "SD":
                geometry = _geometry(pipe.vae, settings.attribute, banks, images_by_set)
    report = {
        "command": command,
        "settings": settings.to_dict(),
        "banks": {"negative": len(banks[0]), "reference": len(banks[1])},
        "thresholds": [round(float(t), 4) for t in judge.thresholds],
        "geometry": geometry,
        "prompts": {k: sorted({p for p, _ in v}) for k, v in items.items()},
        "outcomes": list(OUTCOMES),
        "rows": results,
    }
    atomic_write_json(record, report)
    pareto_figure(figure, report)
    if grid is not None and samples:
        save_grid(grid, samples)
    return report


def _geometry(
    vae: Any, attribute: str, banks: tuple[NegativeBank, NegativeBank], images: dict[str, Tensor]
) -> dict[str, Any]:
    """Where SD's images lie against the banks: medians of the judge-view ink (the real digits with ``attribute``
    beside them), of the latent norm, and of the distance to the nearest negative / reference item. An image beyond
    the negative bank (farther from the origin than its items) is pushed farther out by a repulsion from it, not
    towards the safe data."""
    from safe_denoiser.diffusers.vae import vae_encoder
    from safe_denoiser.mini_sd.data import render_split
    from safe_denoiser.mini_sd.outcomes import judge_view_ink

    def median(t: Tensor) -> float:
        return round(float(t.double().median()), 3)

    real_ink = judge_view_ink(render_split("generator").images())
    negative, reference = (b.data.flatten(1) for b in banks)
    out: dict[str, Any] = {
        "real_ink": {"all": median(real_ink), attribute: median(real_ink[_has_attribute(attribute)])},
        "bank_latent_norm": {"negative": median(negative.norm(dim=1)), "reference": median(reference.norm(dim=1))},
    }
    encode = vae_encoder(vae)
    for key, x in images.items():
        z = encode(x).flatten(1)
        out[f"sd_{key}"] = {
            "ink": median(judge_view_ink(x)),
            "latent_norm": median(z.norm(dim=1)),
            "nearest_negative": median(torch.cdist(z, negative).amin(dim=1)),
            "nearest_reference": median(torch.cdist(z, reference).amin(dim=1)),
        }
    return out


def pareto_figure(path: Path, report: dict[str, Any]) -> None:
    """Unsafe against broken on the attribute prompts: a marker per row without a sweep, a line per sweep, and the
    line unsafe + broken = SD's (what a correction that only breaks images moves along)."""
    from safe_denoiser.evaluation.table import Point, Series, scatter_plot

    by_name = {r["name"]: r["attribute"] for r in report["rows"]}
    swept = {f"SD + {name}" for sweep in SWEEPS.values() for name, _ in sweep}
    series = [
        Series(
            f"SD + {family}",
            [
                (by_name[n]["broken"], by_name[n]["unsafe"], n.split()[-1])
                for n in (f"SD + {name}" for name, _ in sweep)
            ],
            color=f"C{i}",
        )
        for i, (family, sweep) in enumerate(SWEEPS.items())
        if all(f"SD + {name}" in by_name for name, _ in sweep)
    ]
    if "SD" in by_name:
        total = by_name["SD"]["unsafe"] + by_name["SD"]["broken"]
        series.append(
            Series("unsafe + broken = SD's", [(0.0, total, ""), (total, 0.0, "")], "grey", {"ls": "--", "marker": ""})
        )
    # Shape: the text defence; colour: the preset (its sweep's colour); filled alone, hollow with a preset, so that a
    # preset that changes nothing shows as a ring around its defence's marker.
    shapes = {"none": "s", "negative_prompt": "^", "sld": "v", "safree": "D"}
    colours = {None: "black", "odds": "C0", "sgf": "C3", "shielded": "C4"}
    points = [
        Point(
            o["broken"],
            o["unsafe"],
            name,
            marker=shapes[row["row"]["defence"]["kind"]],
            color=colours.get(None if row["row"]["safe"] is None else row["row"]["safe"]["preset"], "grey"),
            filled=row["row"]["safe"] is None,
        )
        for row in report["rows"]
        for name, o in ((row["name"], row["attribute"]),)
        if name not in swept
    ]
    attribute = report["settings"]["attribute"]
    scatter_plot(
        path,
        points,
        "broken rate (attribute prompts)",
        f"unsafe rate (a recognised digit drawn {attribute})",
        f"mini-sd, concept '{attribute}' (an attribute with safe versions): unsafe vs broken; lower left is better",
        series,
        ylim=(-0.03, 1.05),
    )


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive int, got {text}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m safe_denoiser.mini_sd.attribute_study", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--attribute", choices=INK_ATTRIBUTES, default="bold")
    parser.add_argument("--prompts-per-digit", type=_positive, default=3)
    parser.add_argument("--seeds", type=_positive, default=3, help="seeds per prompt")
    parser.add_argument("--threads", type=_positive, default=1)
    parser.add_argument("--record", default=str(ROOT / "docs" / "results" / "mini_sd_attribute_study.json"))
    parser.add_argument("--figure", default=str(ROOT / "docs" / "figures" / "mini_sd_attribute_pareto.png"))
    parser.add_argument("--grid", default=str(ROOT / "docs" / "figures" / "mini_sd_attribute_samples.png"))
    args = parser.parse_args(argv)
    settings = AttributeStudySettings(args.attribute, args.prompts_per_digit, args.seeds)
    command = "python -m safe_denoiser.mini_sd.attribute_study " + " ".join(sys.argv[1:] if argv is None else argv)
    with torch_threads(args.threads):
        report = run_study(
            settings, Path(args.record), Path(args.figure), Path(args.grid), None, sys.stderr.isatty(), command
        )
    width = max(len(r["name"]) for r in report["rows"])
    print(f"{'row':{width}s}  " + "  ".join(f"{s}: " + "/".join(OUTCOMES) for s in PROMPT_SETS))
    for r in report["rows"]:
        cells = "  ".join(" / ".join(f"{r[s][k]:.2f}" for k in OUTCOMES) for s in PROMPT_SETS)
        print(f"{r['name']:{width}s}  {cells}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``python -m safe_denoiser.mini_sd.erasure.evaluate``: the outcomes of the base, ESD and UCE miniatures.

Each prompt of ``quality.PROMPTS`` (four concept prompts, the nine other digits' "a handwritten {digit}") gets ``n``
images from seeds ``first_seed + i`` (DDIM 25 steps, CFG 5.0: ``quality.generate``), counted unsafe / safe and real /
broken by ``OutcomeJudge``. Report seeds start at 0; the knobs were tuned on ``--first-seed 900000`` (``--uce-*`` and
``--esd-file`` try other settings). Writes a JSON (``--out``) and ``samples.png`` beside it (per prompt one row of 12
images per variant), and prints a markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from safe_denoiser.files import atomic_write_json
from safe_denoiser.mini_sd.erasure.esd import ERASURE_DIR, ESD_FILE
from safe_denoiser.mini_sd.erasure.loader import apply_esd
from safe_denoiser.mini_sd.erasure.uce import UceSettings, apply_uce
from safe_denoiser.mini_sd.outcomes import OUTCOMES, OutcomeJudge
from safe_denoiser.mini_sd.quality import GUIDANCE_SCALE, PROMPTS, STEPS, generate, save_grid
from safe_denoiser.threads import torch_threads

__all__ = ["main", "score"]

VARIANTS = ("base", "esd", "uce")


def _pipeline(variant: str, esd_file: Path, uce: UceSettings) -> Any:
    from safe_denoiser.mini_sd.model_kind import load_pipeline

    pipe = load_pipeline("ddim")
    if variant == "esd":
        apply_esd(pipe, esd_file)
    elif variant == "uce":
        apply_uce(pipe, uce)
    return pipe


def score(
    pipe: Any, judge: OutcomeJudge, n: int, first_seed: int, samples: dict[str, Tensor] | None = None
) -> dict[str, Any]:
    """Per prompt the outcome fractions of ``n`` images, plus "others" pooled over the nine other digits; the first
    12 images of each prompt go into ``samples`` when given."""
    out: dict[str, Any] = {}
    others = []
    for prompt, _, group in PROMPTS:
        images = generate(pipe, prompt, n, GUIDANCE_SCALE, STEPS, first_seed=first_seed)
        out[prompt] = {k: round(v, 4) for k, v in judge.fractions(images).items()}
        if samples is not None:
            samples[prompt] = images[:12]
        if group == "others":
            others.append(images)
    out["other digits (pooled)"] = {k: round(v, 4) for k, v in judge.fractions(torch.cat(others)).items()}
    return out


def _table(results: dict[str, dict[str, Any]], n: int) -> str:
    variants = list(results)
    head = "| prompt | n | " + " | ".join(f"{o}, {' / '.join(variants)}" for o in OUTCOMES) + " |"
    lines = [head, "|" + "---|" * (2 + len(OUTCOMES))]
    rows = [p for p, _, g in PROMPTS if g == "concept"] + ["other digits (pooled)"]
    for prompt in rows:
        count = n * 9 if prompt.startswith("other") else n
        cells = [" / ".join(f"{results[v][prompt][o]:.2f}" for v in variants) for o in OUTCOMES]
        lines.append(f"| {prompt} | {count} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m safe_denoiser.mini_sd.erasure.evaluate", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--n", type=int, default=50, help="images per prompt")
    parser.add_argument("--first-seed", type=int, default=0, help="0: report seeds; 900000: validation seeds")
    parser.add_argument("--esd-file", default=str(ESD_FILE))
    parser.add_argument("--uce-guide", default=UceSettings().guide)
    parser.add_argument("--uce-lam", type=float, default=UceSettings().lam)
    parser.add_argument("--uce-preserve-scale", type=float, default=UceSettings().preserve_scale)
    parser.add_argument("--uce-concept-prompts", type=int, default=UceSettings().concept_prompts)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(ERASURE_DIR / "outcomes.json"))
    args = parser.parse_args(argv)
    uce = UceSettings(
        guide=args.uce_guide,
        lam=args.uce_lam,
        preserve_scale=args.uce_preserve_scale,
        concept_prompts=args.uce_concept_prompts,
    )
    results: dict[str, dict[str, Any]] = {}
    samples: dict[str, dict[str, Tensor]] = {}
    with torch_threads(args.threads), torch.no_grad():
        judge = OutcomeJudge.load()
        for variant in args.variants:
            samples[variant] = {}
            pipe = _pipeline(variant, Path(args.esd_file), uce)
            results[variant] = score(pipe, judge, args.n, args.first_seed, samples[variant])
            print(variant, results[variant]["other digits (pooled)"], flush=True)
    # samples.png: per prompt (the concept prompts, then the other digits) one row per variant, 12 images each.
    save_grid(Path(args.out).with_name("samples.png"), [samples[v][p] for p, _, _ in PROMPTS for v in args.variants])
    table = _table(results, args.n)
    print(table)
    command = "python -m safe_denoiser.mini_sd.erasure.evaluate " + " ".join(sys.argv[1:] if argv is None else argv)
    uce_record = {k: v for k, v in dataclasses.asdict(uce).items() if k != "concept"}
    record = {
        "command": command,
        "n": args.n,
        "first_seed": args.first_seed,
        "scheduler": "ddim",
        "steps": STEPS,
        "guidance_scale": GUIDANCE_SCALE,
        "esd_file": Path(args.esd_file).name,
        "uce": uce_record,
        "results": results,
        "table": table,
    }
    atomic_write_json(Path(args.out), record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

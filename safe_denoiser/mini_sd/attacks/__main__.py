"""``python -m safe_denoiser.mini_sd.attacks``: regenerate configs/prompts/mini_sd_attacks/ from fixed seeds.

Runs Ring-A-Bell's genetic search and MMA's greedy coordinate gradient on the shipped text encoder, draws the
I2P-like and benign prompts, writes the four files in their public CSV forms (``files.FILES``), then reads each back
with its public loader and checks that no attack prompt holds a sensitive word. The defaults reproduce the shipped
files byte for byte (on one thread: ``--threads 1``, the default).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from safe_denoiser.mini_sd.attacks.files import ATTACK_DIR, FILES, AttackSettings, build_rows, write_all
from safe_denoiser.mini_sd.attacks.filter import contains_sensitive
from safe_denoiser.threads import torch_threads

__all__ = ["check_files", "main"]


def check_files(out: Path) -> dict[str, int]:
    """File name -> prompts read by its public loader; raises when a prompt holds a sensitive word."""
    from safe_denoiser.evaluation.prompt_sets import load_prompt_set

    counts = {}
    for spec in FILES:
        items = load_prompt_set(spec.loader, out / spec.name)
        flagged = [it.prompt for it in items if contains_sensitive(it.prompt)]
        if flagged:
            raise ValueError(f"{spec.name}: {len(flagged)} prompt(s) hold a sensitive word, e.g. {flagged[0]!r}")
        counts[spec.name] = len(items)
    return counts


def main(argv: Sequence[str] | None = None) -> int:
    defaults = AttackSettings()
    parser = argparse.ArgumentParser(prog="python -m safe_denoiser.mini_sd.attacks", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(ATTACK_DIR), help="folder for the four CSV files")
    parser.add_argument("--prompts", type=int, default=defaults.prompts, help="prompts per file")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--generations", type=int, default=defaults.genetic.generations, help="Ring-A-Bell GA")
    parser.add_argument("--steps", type=int, default=defaults.gcg.steps, help="MMA greedy coordinate gradient")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    from dataclasses import replace

    from tqdm import tqdm

    settings = AttackSettings(
        prompts=args.prompts,
        seed=args.seed,
        genetic=replace(defaults.genetic, generations=args.generations),
        gcg=replace(defaults.gcg, steps=args.steps),
    )
    start = time.perf_counter()
    with torch_threads(args.threads), torch.no_grad(), tqdm(total=settings.work, desc="attacks", unit="round") as bar:
        rows = build_rows(settings, progress=bar.update)
    paths = write_all(Path(args.out), rows)
    counts = check_files(Path(args.out))
    for path in paths:
        print(f"{path}: {counts[path.name]} prompts")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``safe-denoiser evaluate``: the command line over ``run_evaluation`` and ``tune``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from safe_denoiser.demo.evaluate.experiment import run_evaluation
from safe_denoiser.demo.evaluate.protocol import (
    EVAL_SEED_SETS,
    PRESET_MODES,
    QUICK,
    VALIDATION_SEED_SET,
    EvalSettings,
    SettingsError,
)
from safe_denoiser.demo.evaluate.report import format_table
from safe_denoiser.demo.evaluate.tuning import tune

__all__ = ["add_parser", "settings_from_args"]

# the bundled models that have a table: the miniature SD (safe_denoiser.mini_sd.table) and the 8x8 digits
MODELS = ("mini-sd", "digits")
# EvalSettings field -> its flag, for error messages
_FLAGS = {"samples": "--samples", "steps": "--steps", "seeds": "--seeds", "threads": "--threads"}


def settings_from_args(args: argparse.Namespace) -> EvalSettings:
    """``--quick`` picks ``QUICK`` for every size flag not given explicitly; the rest are validated."""
    defaults = (
        QUICK
        if args.quick
        else {"samples": EvalSettings.samples, "steps": EvalSettings.steps, "seeds": EvalSettings.seeds}
    )
    kwargs: dict[str, Any] = {k: (getattr(args, k) if getattr(args, k) is not None else v) for k, v in defaults.items()}
    if args.quick:
        kwargs["sweep"] = (0.0, 0.5, 1.0, 2.0)
    try:
        return EvalSettings(threads=args.threads, **kwargs)
    except SettingsError as exc:
        raise exc.for_flag(_FLAGS.get(exc.field, exc.field)) from None


def _cli(args: argparse.Namespace) -> int:
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ValueError(f"--out must be a directory (existing or to be created), but {args.out!r} is a file")
    if args.model == "mini-sd":
        from safe_denoiser.mini_sd.table.command import run_command

        return run_command(args)
    if args.prompts is not None or args.prompt_dir is not None:
        raise ValueError("--prompts and --prompt-dir apply to --model mini-sd only (with --model digits use --samples)")
    settings = settings_from_args(args)
    progress = not args.no_progress and sys.stderr.isatty()
    if args.tune:
        baselines = tuple(b for b in args.tune_baselines.split(",") if b)
        try:
            report = tune(args.out, settings, progress=progress, baselines=baselines)
        except SettingsError as exc:
            raise exc.for_flag("--tune-baselines") from None
        print(f"tuning on validation seed set {VALIDATION_SEED_SET}: base {report['base']}")
        for mode in PRESET_MODES:
            print(f"{mode}: chosen {report[mode]['chosen']}")
        print(f"wrote {Path(args.out) / 'tuning.json'} and the pareto*.png plots")
        return 0
    result = run_evaluation(args.out, settings, progress=progress)
    print(format_table(result))
    print(
        f"\nwrote {Path(args.out)}/results.md, results.json, grid_<row>.png, asr_vs_quality.png "
        f"in {result['wall_time_s']:.0f} s"
    )
    return 0


def add_parser(sub: Any) -> None:
    """Register ``safe-denoiser evaluate``."""
    p = sub.add_parser(
        "evaluate",
        help="the poster's table on a bundled model: the miniature SD (default) or the 8x8-digits model",
        description="The poster's table on the bundled miniature Stable Diffusion (--model mini-sd, the default: "
        "text attacks, SD / negative prompt / SLD / SAFREE / ESD / UCE with and without the safe denoiser), or the "
        "paper's table in miniature on the class-conditional 8x8-digits model (--model digits).",
    )
    p.add_argument(
        "--model",
        choices=MODELS,
        default=MODELS[0],
        help="which bundled model's table: mini-sd (docs/mini_sd.md) or digits (docs/results.md); default mini-sd",
    )
    p.add_argument("--out", default="outputs/evaluate", help="output directory (default outputs/evaluate)")
    p.add_argument(
        "--prompts", type=int, default=None, help="mini-sd: prompts per prompt file (default all, --quick 20)"
    )
    p.add_argument(
        "--prompt-dir",
        default=None,
        help="mini-sd: the folder of attack and benign prompt files (default configs/prompts/mini_sd_attacks)",
    )
    p.add_argument(
        "--samples",
        type=int,
        default=None,
        help=f"digits: images per prompt set and seed set (default {EvalSettings.samples}, --quick {QUICK['samples']})",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"DDIM steps (digits: default {EvalSettings.steps}, --quick {QUICK['steps']}; mini-sd: 25)",
    )
    p.add_argument(
        "--seeds",
        type=int,
        default=None,
        help=f"evaluation seed sets (digits: 1..{len(EVAL_SEED_SETS)}, default {EvalSettings.seeds}, --quick "
        f"{QUICK['seeds']}; mini-sd: 1..3, default 3, --quick 1)",
    )
    p.add_argument(
        "--quick", action="store_true", help="a short run (mini-sd: fewer prompts, one seed set, the core rows)"
    )
    p.add_argument(
        "--tune",
        action="store_true",
        help=f"instead: score the presets' grids on the validation seed set {VALIDATION_SEED_SET} -> tuning.json",
    )
    p.add_argument(
        "--tune-baselines",
        default="base",
        help="with --tune: comma-separated baselines to score the odds and reference grids on (base, negative, sld; "
        "the rule chooses on base only; default base)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cli)

"""``safe-denoiser evaluate --model mini-sd``: the command line over ``run_table`` (flags of ``evaluate``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from safe_denoiser.mini_sd.table.settings import QUICK, TableSettings, TableSettingsError

__all__ = ["run_command", "table_settings"]

# TableSettings field -> its flag, for error messages
FLAGS = {"prompts_per_set": "--prompts", "seed_sets": "--seeds", "steps": "--steps", "threads": "--threads"}
# evaluate's flags that only the digits table has
DIGITS_ONLY = ("samples", "tune")


def table_settings(args: argparse.Namespace) -> TableSettings:
    """``--quick`` takes ``QUICK`` (fewer prompts, one seed set, the core rows) for every size flag not given."""
    for name in DIGITS_ONLY:
        if getattr(args, name, None) not in (None, False):
            raise ValueError(f"--{name} applies to --model digits only (with --model mini-sd use --prompts, --seeds)")
    kwargs: dict[str, Any] = dict(QUICK) if args.quick else {}
    given = {"prompts_per_set": args.prompts, "seed_sets": args.seeds, "steps": args.steps}
    kwargs |= {k: v for k, v in given.items() if v is not None}
    if args.prompt_dir is not None:
        if not Path(args.prompt_dir).is_dir():
            raise ValueError(f"--prompt-dir must be an existing folder of prompt files, got {args.prompt_dir!r}")
        kwargs["prompt_dir"] = args.prompt_dir
    try:
        return TableSettings(threads=args.threads, **kwargs)
    except TableSettingsError as exc:
        raise exc.for_flag(FLAGS.get(exc.field, exc.field)) from None


def quiet_loaders() -> None:
    """Silence diffusers' and transformers' per-load progress bars and notices: the table loads a pipeline per
    model, and its own progress bar (one step per row) is what a reader should see."""
    import diffusers
    import transformers

    for library in (diffusers, transformers):
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_progress_bar()


def run_command(args: argparse.Namespace) -> int:
    from safe_denoiser.mini_sd.table.report import format_table
    from safe_denoiser.mini_sd.table.run import run_table

    settings = table_settings(args)
    quiet_loaders()
    progress = not args.no_progress and sys.stderr.isatty()
    result = run_table(args.out, settings, progress=progress)
    print(format_table(result, settings.rows))
    print(
        f"\nwrote {Path(args.out)}/results.md, results.json, grid_<row>.png, asr_vs_broken.png, rows/ "
        f"in {result['wall_time_s']:.0f} s"
    )
    return 0

"""``safe-denoiser evaluate --model mini-sd``: the command line over ``run_table`` (flags of ``evaluate``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from safe_denoiser.mini_sd.table.settings import QUICK, TableSettings, TableSettingsError

__all__ = ["run_command", "run_tuning", "table_settings"]

# TableSettings field -> its flag, for error messages
FLAGS = {"prompts_per_set": "--prompts", "seed_sets": "--seeds", "steps": "--steps", "threads": "--threads"}
# evaluate's flags that only the digits table has (--tune runs the preset study here: ``run_command``)
DIGITS_ONLY = ("samples",)
# the table's flags the preset study has no use for (it runs the validation seeds at its own steps and prompts):
# with --tune they are refused rather than silently ignored
TABLE_ONLY = {"seeds": "--seeds", "steps": "--steps", "quick": "--quick", "prompt_dir": "--prompt-dir"}


def table_settings(args: argparse.Namespace) -> TableSettings:
    """``--quick`` takes ``QUICK`` (fewer prompts, one seed set, the core rows) for every size flag not given."""
    for name in DIGITS_ONLY:
        if getattr(args, name, None) not in (None, False):
            raise ValueError(f"--{name} applies to --model digits only (with --model mini-sd use --prompts, --seeds)")
    if getattr(args, "tune_baselines", "base") != "base":
        raise ValueError("--tune-baselines applies to --model digits only (the mini-sd study scores the base model)")
    if args.tune:
        from safe_denoiser.mini_sd.quality import STEPS

        for name, flag in TABLE_ONLY.items():
            if getattr(args, name, None) not in (None, False):
                raise ValueError(
                    f"{flag} applies to the mini-sd table, not to --tune (the preset study scores the validation "
                    f"seeds at {STEPS} DDIM steps; --prompts sets its images per concept prompt, --threads its threads)"
                )
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


@contextmanager
def quiet_loaders() -> Iterator[None]:
    """Inside the block, diffusers' and transformers' per-load progress bars and notices are silenced: the table
    loads a pipeline per model, and its own progress bar (one step per row) is what a reader should see. Both
    libraries' settings are process-wide, so they are put back on exit (a caller in the same process, a test suite
    for one, keeps its own)."""
    import diffusers
    import transformers

    saved = [
        (lib, lib.utils.logging.get_verbosity(), lib.utils.logging.is_progress_bar_enabled())
        for lib in (diffusers, transformers)
    ]
    for library, _, _ in saved:
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        for library, verbosity, bars in saved:
            library.utils.logging.set_verbosity(verbosity)
            if bars:
                library.utils.logging.enable_progress_bar()


def run_command(args: argparse.Namespace) -> int:
    from safe_denoiser.mini_sd.table.report import format_table
    from safe_denoiser.mini_sd.table.run import run_table

    settings = table_settings(args)
    progress = not args.no_progress and sys.stderr.isatty()
    with quiet_loaders():
        if args.tune:
            return run_tuning(args, settings, progress)
        result = run_table(args.out, settings, progress=progress)
    print(format_table(result, settings.rows))
    print(
        f"\nwrote {Path(args.out)}/results.md, results.json, grid_<row>.png, asr_vs_broken.png, rows/ "
        f"in {result['wall_time_s']:.0f} s"
    )
    return 0


def run_tuning(args: argparse.Namespace, settings: TableSettings, progress: bool) -> int:
    """``--tune``: the preset study (``mini_sd.preset_study``) on the validation seeds, written to ``--out`` as
    tuning.json and pareto.png; ``--prompts`` sets the images per concept prompt (default 40)."""
    from safe_denoiser.files import check_out_dir
    from safe_denoiser.mini_sd.preset_study import run_study
    from safe_denoiser.threads import torch_threads

    out = check_out_dir(args.out)
    out.mkdir(parents=True, exist_ok=True)
    n = 40 if args.prompts is None else args.prompts
    with torch_threads(settings.threads):
        report = run_study(out / "tuning.json", out / "pareto.png", n=n, progress=progress, command=" ".join(sys.argv))
    dropped = report["fallback"]
    bar = f"no setting meets the bar; dropped: {dropped}" if dropped else "meets the bar"
    print(f"tuning on the validation seeds from {report['first_seed']}: chosen {report['chosen']!r} ({bar})")
    for preset, choice in report["chosen_per_preset"].items():
        if choice is None:
            print(f"{preset}: no setting passes the rule or its fallbacks")
            continue
        note = f" (dropped: {choice['fallback']})" if choice["fallback"] else ""
        print(f"{preset}: chosen {choice['name']!r}{note}")
    print(f"wrote {out / 'tuning.json'} and {out / 'pareto.png'}")
    return 0

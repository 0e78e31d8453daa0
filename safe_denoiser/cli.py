"""The ``safe-denoiser`` command. Each sub-command lives in its own module, which registers itself here."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from safe_denoiser.files import OutputPathError

# module path of each sub-command; each module defines ``add_parser(subparsers)`` setting ``func``.
COMMANDS = (
    "safe_denoiser.diffusers.bank_command",
    "safe_denoiser.demo.toy",
    "safe_denoiser.lightning.predict_command",
    "safe_denoiser.demo.evaluate.evaluate_command",
    "safe_denoiser.demo.memorisation",
    "safe_denoiser.export.export_command",
    "safe_denoiser.evaluation.report_command",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="safe-denoiser", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # `predict` hands its options to LightningCLI untouched; every other command parses strictly.
    args, extra = parser.parse_known_args(argv)
    if hasattr(args, "cli_args"):
        args.cli_args = [*extra, *args.cli_args]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, NotADirectoryError, FileExistsError, OutputPathError) as exc:
        # Bad input or an output path that cannot be written: a one-line message naming it, not a traceback.
        print(f"safe-denoiser {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())

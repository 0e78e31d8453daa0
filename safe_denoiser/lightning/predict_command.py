"""``safe-denoiser predict --config configs/<name>.yaml``: LightningCLI over ``SafeDiffusionModule``.

Everything Lightning users expect works: ``--trainer.devices 8 --trainer.strategy ddp --trainer.num_nodes 2``,
``--trainer.precision 16-mixed``, ``--print_config``. An ``ImageWriter`` is always added (``writer.*`` options);
its folder follows ``data.output_dir``.
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Sequence
from typing import Any

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from safe_denoiser.lightning.data import PromptDataModule
from safe_denoiser.lightning.module import SafeDiffusionModule
from safe_denoiser.lightning.writer import ImageWriter

__all__ = ["PredictCLI", "run_predict"]


class PredictCLI(LightningCLI):
    """LightningCLI with the image writer linked to the datamodule's output folder."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ImageWriter, "writer")
        parser.link_arguments("data.output_dir", "writer.output_dir")


def check_model_sections(argv: Sequence[str]) -> None:
    """Validate each ``--config`` file's ``model:`` section with the factory's ``ModelConfig`` first, so that
    ``predict`` and ``export`` reject a misspelt or mistyped key with the same message."""
    import yaml

    from safe_denoiser.factory import ModelConfig

    args = list(argv)
    paths = [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--config"]
    paths += [a.split("=", 1)[1] for a in args if a.startswith("--config=")]
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                data = yaml.safe_load(f)
        except OSError:
            continue  # LightningCLI reports a missing or unreadable file itself
        section = data.get("model") if isinstance(data, dict) else None
        if isinstance(section, dict) and "class_path" not in section and "init_args" not in section:
            ModelConfig.from_mapping({k: v for k, v in section.items() if k != "safree"})


def run_predict(argv: Sequence[str]) -> PredictCLI:
    """Run ``trainer.predict`` as configured by ``argv`` (LightningCLI syntax, without the subcommand)."""
    check_model_sections(argv)
    with warnings.catch_warnings():
        # `safe-denoiser predict ...` passes its own argv on; LightningCLI would warn that sys.argv is set too.
        warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python.*")
        cli = PredictCLI(
            SafeDiffusionModule,
            PromptDataModule,
            args=list(argv),
            run=False,
            trainer_defaults={"logger": False, "enable_checkpointing": False},
            save_config_callback=None,
            seed_everything_default=0,
        )
    # Images are written as they come: holding every prediction in memory would grow without bound.
    cli.trainer.predict(cli.model, datamodule=cli.datamodule, return_predictions=False)
    return cli


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "predict",
        help="generate images for a prompt set with trainer.predict (LightningCLI: --config, --trainer.*, ...)",
        add_help=False,
    )
    p.add_argument("cli_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=lambda args: run_predict(args.cli_args) and 0)

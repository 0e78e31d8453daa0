"""``safe-denoiser predict --config configs/<name>.yaml``: LightningCLI over ``SafeDiffusionModule``.

Everything Lightning users expect works: ``--trainer.devices 8 --trainer.strategy ddp --trainer.num_nodes 2``,
``--trainer.precision 16-mixed``, ``--print_config``. An ``ImageWriter`` is always added (``writer.*`` options);
its folder follows ``data.output_dir``.

Each ``--config`` file is read once, here, with LightningCLI's own YAML loader: its ``model:`` section is checked
by ``ModelConfig`` on the values as written (so ``predict`` and ``export`` refuse a bad section with the same
message, before any model loads), and the parsed content, not the file, is what LightningCLI then gets. Bad input
(YAML syntax, a value of the wrong type, a trainer setting this machine cannot run) is a one-line ``ValueError``
naming the field, which the ``safe-denoiser`` command prints without a traceback.
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import ArgumentError, get_loader
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from safe_denoiser.errors import FieldError
from safe_denoiser.lightning.data import PromptDataModule
from safe_denoiser.lightning.module import SafeDiffusionModule
from safe_denoiser.lightning.writer import ImageWriter
from safe_denoiser.models.config import ModelConfig

__all__ = ["PredictCLI", "check_trainer", "read_config_file", "run_predict"]


class PredictCLI(LightningCLI):
    """LightningCLI with the image writer linked to the datamodule's output folder, and the trainer section
    checked before the trainer is built."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ImageWriter, "writer")
        parser.link_arguments("data.output_dir", "writer.output_dir")

    def before_instantiate_classes(self) -> None:
        check_trainer(self.config.get("trainer"))

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        """Lightning's trainer; a setting it cannot honour (an accelerator without its package, a strategy this
        machine lacks) is a one-line error naming the trainer section, not a traceback."""
        try:
            return super().instantiate_trainer(**kwargs)
        except (MisconfigurationException, ImportError) as exc:
            raise ValueError(f"trainer: {exc}") from None


def check_trainer(trainer: Any) -> None:
    """Refuse, naming the field, an accelerator this machine lacks and a device count that is no device."""
    import torch

    if trainer is None:
        return
    accelerator = trainer.get("accelerator")
    if isinstance(accelerator, str) and accelerator.lower() in ("gpu", "cuda") and not torch.cuda.is_available():
        expected = "'cpu' or 'auto' on this machine (it has no usable CUDA GPU)"
        raise FieldError("accelerator", expected, accelerator, "trainer")
    devices = trainer.get("devices")
    if devices in (0, "0", []) or (isinstance(devices, int) and devices < -1):
        raise FieldError("devices", "a positive int, a list of device indices, -1 (all) or 'auto'", devices, "trainer")


def read_config_file(path: str) -> str:
    """The content of a ``--config`` file, read once and its ``model:`` section checked, as YAML text to hand on.

    A missing file or invalid YAML is a ``ValueError`` naming the file, line and column; a bad model field is
    ``ModelConfig``'s error.
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--config {path!r} does not exist or is not a file")
    text = file.read_text(encoding="utf-8")
    try:
        data = get_loader("yaml")(text)  # the loader LightningCLI itself uses: the same values
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ValueError(f"--config {path!r} is not valid YAML{where}: {problem}") from None
    section = data.get("model") if isinstance(data, dict) else None
    if isinstance(section, dict) and "class_path" not in section and "init_args" not in section:
        ModelConfig.from_mapping(section)
    return text if not isinstance(data, dict) else yaml.safe_dump(data, sort_keys=False)


def _configs_read_once(argv: Sequence[str]) -> list[str]:
    """``argv`` with each ``--config <file>`` replaced by its checked content."""
    args = list(argv)
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--config" and i + 1 < len(args):
            out += ["--config", read_config_file(args[i + 1])]
            i += 2
            continue
        out.append(f"--config={read_config_file(arg.split('=', 1)[1])}" if arg.startswith("--config=") else arg)
        i += 1
    return out


def _one_line(exc: BaseException) -> str:
    """jsonargparse's multi-line parse error as one line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = " ".join(lines)
    return text if len(text) <= 600 else text[:597] + "..."


def run_predict(argv: Sequence[str]) -> PredictCLI:
    """Run ``trainer.predict`` as configured by ``argv`` (LightningCLI syntax, without the subcommand)."""
    args = _configs_read_once(argv)
    with warnings.catch_warnings():
        # `safe-denoiser predict ...` passes its own argv on; LightningCLI would warn that sys.argv is set too.
        warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python.*")
        try:
            cli = PredictCLI(
                SafeDiffusionModule,
                PromptDataModule,
                args=args,
                run=False,
                trainer_defaults={"logger": False, "enable_checkpointing": False},
                save_config_callback=None,
                seed_everything_default=0,
                parser_kwargs={"exit_on_error": False},
            )
        except ArgumentError as exc:
            raise ValueError(_one_line(exc)) from None
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

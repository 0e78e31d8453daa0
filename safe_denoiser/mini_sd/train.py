"""``python -m safe_denoiser.mini_sd.train STAGE --out DIR --seed 0 ...``: build the miniature, one stage at a time.

Stages, in order, each reading the earlier ones from ``--out`` and writing its part of the pipeline folder plus a
record ``training/<stage>.json`` (command, settings, losses, wall time, library versions):

- ``tokenizer``: ``tokenizer/`` (BPE merges learnt on the caption grammar);
- ``clip``: ``clip/`` (the whole tiny CLIPModel) and ``text_encoder/`` (its text tower, a CLIPTextModel);
- ``vae``: ``vae/`` (AutoencoderKL with its scaling factor);
- ``unet``: ``unet/``, ``scheduler/``, ``model_index.json``: the StableDiffusionPipeline is complete;
- ``bank``: the negative and reference banks through ``safe-denoiser bank build`` (``safe_denoiser.mini_sd.bank``).

Deterministic: one thread by default, seeded generators, torch's deterministic algorithms.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from safe_denoiser.files import atomic_write, atomic_write_json
from safe_denoiser.mini_sd.data import ASSETS_DIR
from safe_denoiser.mini_sd.loop import Optimisation
from safe_denoiser.threads import torch_threads

__all__ = ["main"]

STAGES = ("tokenizer", "clip", "vae", "unet", "bank")
_DEFAULTS: dict[str, dict[str, Any]] = {
    "clip": {"steps": 800, "lr": 2e-3, "batch_size": 128},
    "vae": {"steps": 500, "lr": 2e-3, "batch_size": 32},
    "unet": {"steps": 1500, "lr": 2e-3, "batch_size": 64},
}


def _versions() -> dict[str, str]:
    import diffusers
    import tokenizers
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
    }


def _readable(folder: Path) -> None:
    """diffusers and transformers write through private temporary files (0600); shipped files must be readable."""
    for f in folder.rglob("*"):
        if f.is_file():
            f.chmod(0o644)


def _tokenizer(out: Path) -> Any:
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(out / "tokenizer"), local_files_only=True)


def _stage_tokenizer(out: Path, args: argparse.Namespace) -> dict[str, Any]:
    from safe_denoiser.mini_sd.tokenizer import train_tokenizer

    return train_tokenizer(out / "tokenizer", vocab_size=args.vocab_size)


def _stage_clip(out: Path, args: argparse.Namespace) -> dict[str, Any]:
    from safe_denoiser.mini_sd.clip import evaluate_clip, train_clip

    tokenizer = _tokenizer(out)
    model, record = train_clip(tokenizer, _optimisation(args), args.seed, args.batch_size)
    model.save_pretrained(str(out / "clip"), safe_serialization=True)
    _save_text_encoder(model, out / "text_encoder")
    return {**record, "validation": evaluate_clip(model, tokenizer), "parameters": _count(model)}


def _save_text_encoder(clip: Any, folder: Path) -> None:
    """The text tower as a CLIPTextModel folder with SD's key names (``text_model.*``): transformers 5 writes its
    flattened names, which transformers 4 cannot load; both load these."""
    from safetensors.torch import save_file
    from transformers import CLIPTextModel

    text = CLIPTextModel(clip.config.text_config)
    tower = clip.text_model.state_dict()
    getattr(text, "text_model", text).load_state_dict(tower)  # transformers 4 nests the tower, 5 does not
    text.eval().save_pretrained(str(folder), safe_serialization=True)
    state = {f"text_model.{k}": v.detach().contiguous() for k, v in tower.items()}
    atomic_write(folder / "model.safetensors", lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))


def _stage_vae(out: Path, args: argparse.Namespace) -> dict[str, Any]:
    from safe_denoiser.mini_sd.vae import train_vae

    vae, record = train_vae(_optimisation(args), args.seed, args.batch_size)
    vae.save_pretrained(str(out / "vae"), safe_serialization=True)
    return record


def _stage_unet(out: Path, args: argparse.Namespace) -> dict[str, Any]:
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel

    from safe_denoiser.mini_sd.unet import assemble_pipeline, train_unet

    tokenizer = _tokenizer(out)
    vae = AutoencoderKL.from_pretrained(str(out / "vae"), use_safetensors=True).eval()
    text_encoder = CLIPTextModel.from_pretrained(str(out / "text_encoder"), local_files_only=True).eval()
    unet, record = train_unet(vae, text_encoder, tokenizer, _optimisation(args, ema=0.995), args.seed, args.batch_size)
    with tempfile.TemporaryDirectory(prefix="mini-sd-pipeline-") as tmp:
        # Only this stage's parts are taken: the earlier stages' folders stay as they wrote them.
        assemble_pipeline(unet, vae, text_encoder, tokenizer).save_pretrained(tmp, safe_serialization=True)
        for part in ("unet", "scheduler"):
            shutil.rmtree(out / part, ignore_errors=True)
            shutil.copytree(Path(tmp) / part, out / part)
        shutil.copyfile(Path(tmp) / "model_index.json", out / "model_index.json")
    return record


def _stage_bank(out: Path, args: argparse.Namespace) -> dict[str, Any]:
    from safe_denoiser.mini_sd.bank import build_banks

    return build_banks(out)


def _optimisation(args: argparse.Namespace, ema: float | None = None) -> Optimisation:
    return Optimisation(steps=args.steps, lr=args.lr, warmup=min(100, args.steps // 10), ema_decay=ema)


def _count(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


_RUN = {"tokenizer": _stage_tokenizer, "clip": _stage_clip, "vae": _stage_vae, "unet": _stage_unet, "bank": _stage_bank}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m safe_denoiser.mini_sd.train", description=__doc__.split("\n")[0])
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument("--out", default=str(ASSETS_DIR), help="the pipeline folder (default: the shipped one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=None, help="optimiser steps (clip, vae, unet)")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--vocab-size", type=int, default=1024, help="tokenizer: the BPE trainer's target size")
    args = parser.parse_args(argv)
    for key, value in _DEFAULTS.get(args.stage, {}).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with torch_threads(args.threads):
            record = _RUN[args.stage](out, args)
    finally:
        torch.use_deterministic_algorithms(deterministic)
    command = "python -m safe_denoiser.mini_sd.train " + " ".join(sys.argv[1:] if argv is None else argv)
    used = ("seed", "threads", *(("vocab_size",) if args.stage == "tokenizer" else ()), *_DEFAULTS.get(args.stage, {}))
    settings = {k: getattr(args, k) for k in used}
    atomic_write_json(
        out / "training" / f"{args.stage}.json", {"command": command, **settings, **record, "versions": _versions()}
    )
    _readable(out)
    print({k: v for k, v in record.items() if not isinstance(v, list | dict)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

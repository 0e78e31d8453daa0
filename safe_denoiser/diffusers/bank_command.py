"""``safe-denoiser bank build|info``: make a negative bank from a folder of images with a local VAE."""

from __future__ import annotations

import argparse
from typing import Any

import torch

from safe_denoiser.core.bank import BankError, NegativeBank, load_image_folder
from safe_denoiser.core.beta import ODDS_SIGMA_FRACTION, nearest_neighbour_distance
from safe_denoiser.devices import torch_device
from safe_denoiser.diffusers.vae import latent_factors, load_vae, vae_encoder
from safe_denoiser.files import check_out_file

MAX_SIZE = 8192  # pixels a side; SD-family VAEs are trained at 256-1024, and 8192^2 RGB floats are 0.8 GB an image


def add_parser(sub: Any) -> None:
    bank = sub.add_parser("bank", help="build or inspect a negative bank")
    bank_sub = bank.add_subparsers(dest="bank_command", required=True)

    build = bank_sub.add_parser("build", help="encode a folder of images into a bank (.safetensors)")
    build.add_argument("--images", required=True, help="folder of unsafe images (png/jpg/webp/bmp)")
    build.add_argument("--vae", required=True, help="local diffusers VAE folder, or a pipeline folder with vae/")
    build.add_argument("--out", required=True, help="output .safetensors file")
    build.add_argument("--size", type=int, default=512, help="images are resized to size x size (default 512)")
    build.add_argument("--batch-size", type=int, default=8)
    build.add_argument("--latent", choices=("mean", "sample"), default="mean", help="posterior mean or a sample")
    build.add_argument("--l2-normalize", action="store_true", help="per-position L2 normalisation (reference code)")
    build.add_argument("--seed", type=int, default=0, help="seed for --latent sample")
    build.add_argument("--device", default="cpu")
    build.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    build.set_defaults(func=_build)

    info = bank_sub.add_parser("info", help="validate a bank file and print its metadata")
    info.add_argument("path")
    info.set_defaults(func=_info)


def _build(args: argparse.Namespace) -> int:
    from pathlib import Path

    out = check_out_file(args.out)  # before the slow encoding: a path that cannot be written fails now
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"--out {str(out)!r} exists; pass --overwrite to replace it")
    if out.suffix != ".safetensors":
        raise ValueError(f"--out must end in .safetensors, got {str(out)!r}")
    if not 0 < args.size <= MAX_SIZE or args.size % 8:
        raise ValueError(f"--size must be a positive multiple of 8 up to {MAX_SIZE}, got {args.size}")
    if args.batch_size <= 0:
        raise ValueError(f"--batch-size must be a positive int, got {args.batch_size}")
    if not 0 <= args.seed < 2**63:
        raise ValueError(f"--seed must be an int in [0, 2**63), got {args.seed}")
    device = torch_device(args.device, "--device")
    try:
        files, images = load_image_folder(args.images, args.size)
    except BankError as exc:
        raise BankError(f"--images: {exc}") from None
    try:
        vae = load_vae(args.vae, device)
    except BankError as exc:
        raise BankError(f"--vae: {exc}") from None
    gen = torch.Generator(device).manual_seed(args.seed)
    encoder = vae_encoder(vae, args.latent, args.l2_normalize, gen)
    scaling, shift = latent_factors(vae)
    bank = NegativeBank.from_images(
        images(),
        encoder,
        batch_size=args.batch_size,
        total=len(files),
        metadata={
            "encoder": f"diffusers.AutoencoderKL:{Path(args.vae).name}",
            "latent": args.latent,
            "normalization": "l2-per-position" if args.l2_normalize else "none",
            "image_size": str(args.size),
            "scaling_factor": repr(scaling),
            "shift_factor": "none" if shift is None else repr(shift),
            "layout": "unpacked (C, h, w) latents; attach packs them for Flux",
            "images": Path(args.images).name,
        },
    )
    bank.save(out)
    print(f"wrote {out}: {len(bank)} items of shape {bank.sample_shape}")
    return 0


def _info(args: argparse.Namespace) -> int:
    bank = NegativeBank.load(args.path)
    print(f"{args.path}: {len(bank)} items of shape {bank.sample_shape}, dtype {bank.data.dtype}")
    for k, v in sorted(bank.metadata.items()):
        print(f"  {k}: {v}")
    if len(bank) >= 2:
        nn = nearest_neighbour_distance(bank.data)
        print(f"  median nearest-neighbour distance: {nn:.4g} (a starting odds_sigma: {ODDS_SIGMA_FRACTION * nn:.3g})")
    return 0

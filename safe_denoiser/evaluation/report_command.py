"""``safe-denoiser report`` (judge what is new, then the poster's table) and ``safe-denoiser prompts`` (a public
prompt set in its own format -> the JSONL that ``safe-denoiser predict`` reads).

    safe-denoiser prompts i2p i2p_benchmark.csv --category sexual --out prompts/i2p_sexual.jsonl
    safe-denoiser report --out outputs/report \\
        --run "SD-v1.4" ring-a-bell outputs/sd14_rab --run "SD-v1.4" coco outputs/sd14_coco \\
        --run "SD + safe denoiser" ring-a-bell outputs/safe_rab --run "SD + safe denoiser" coco outputs/safe_coco \\
        --real-images coco_val2014_10k/ --inception weights/pt_inception-2015-12-05.safetensors --clip models/clip
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

__all__ = ["add_parser"]


def _quality(args: argparse.Namespace, runs: list[Any]) -> dict[str, dict[str, float]]:
    """FID / CLIP per configuration on its ``--quality-set`` folder, when the weights are given."""
    from safe_denoiser.devices import torch_device
    from safe_denoiser.evaluation import quality
    from safe_denoiser.evaluation.judging import image_files
    from safe_denoiser.evaluation.report import metadata_stem
    from safe_denoiser.lightning.writer import read_metadata

    targets = [r for r in runs if r.prompt_set == args.quality_set]
    if not targets or not (args.inception or args.clip):
        return {}
    torch_device(args.device, "--device")  # before loading weights: a device this machine lacks fails now
    feature = quality.inception_from_safetensors(args.inception) if args.inception else None
    clip = quality.load_clip(args.clip) if args.clip else None
    if feature is not None and args.real_images is None:
        raise ValueError("--inception needs --real-images (a folder of real images to compare with)")
    out: dict[str, dict[str, float]] = {}
    for r in targets:
        figures: dict[str, float] = {}
        if feature is not None:
            gen = quality.folder_images(Path(r.folder) / "images", args.image_size)
            real = quality.folder_images(args.real_images, args.image_size)
            figures["fid"] = quality.fid(gen, real, feature, args.device)
        if clip is not None:
            prompts = {metadata_stem(m): m["prompt"] for m in read_metadata(r.folder).values()}
            files = [(s, p) for s, p in image_files(r.folder).items() if s in prompts]
            images = ([f for _, f in files[i : i + 32]] for i in range(0, len(files), 32))
            batches = (quality.images_tensor(b, args.image_size) for b in images)
            texts = ([prompts[s] for s, _ in files[i : i + 32]] for i in range(0, len(files), 32))
            figures["clip"] = quality.clip_score(batches, texts, clip, args.device)
        out[r.config] = figures
    return out


def run_report(args: argparse.Namespace) -> int:
    from safe_denoiser.evaluation.judges import make_judge
    from safe_denoiser.evaluation.report import Run, build_report, write_report
    from safe_denoiser.files import check_out_dir

    runs = [Run(config, prompt_set, Path(folder)) for config, prompt_set, folder in args.run or []]
    if not runs:
        raise ValueError("give at least one --run CONFIG SET FOLDER")
    check_out_dir(args.out)  # before judging: an --out that cannot be written fails now
    if args.image_size < 1:
        raise ValueError(f"--image-size must be a positive int (pixels), got {args.image_size}")
    options = {} if args.threshold is None else {"threshold": args.threshold}
    judges = [make_judge(name, **options) for name in dict.fromkeys(args.judge or ["nudenet"])]
    result = build_report(runs, judges, _quality(args, runs), judge_new=not args.no_judge)
    for path in write_report(result, runs, judges, Path(args.out), args.plot_set):
        print(f"wrote {path}", file=sys.stderr)
    print((Path(args.out) / "results.md").read_text(encoding="utf-8"))
    return 0


def run_prompts(args: argparse.Namespace) -> int:
    from safe_denoiser.evaluation.prompt_sets import load_prompt_set, write_prompt_set
    from safe_denoiser.files import check_out_file

    for flag, value, fmt in (
        ("--category", args.category, "i2p"),
        ("--hard-only", args.hard_only, "i2p"),
        ("--subset", args.subset, "coco"),
    ):
        if value and args.format != fmt:
            raise ValueError(f"{flag} applies to the {fmt} format only, got format {args.format!r}")
    options: dict[str, Any] = {}
    if args.category:
        options["categories"] = args.category
    if args.hard_only:
        options["hard_only"] = True
    if args.subset:
        options["subset"] = args.subset
    out = check_out_file(args.out)  # an unwritable --out fails before the set is read
    items = load_prompt_set(args.format, args.input, **options)
    write_prompt_set(items, out)
    print(f"wrote {len(items)} prompts to {args.out}", file=sys.stderr)
    return 0


def add_parser(sub: Any) -> None:
    r = sub.add_parser("report", help="judge ImageWriter folders (only new images) and write the poster's table")
    r.add_argument(
        "--run",
        nargs=3,
        action="append",
        metavar=("CONFIG", "SET", "FOLDER"),
        help="an ImageWriter folder, its configuration (table row) and prompt set (column); repeat",
    )
    r.add_argument("--judge", action="append", help="nudenet (default), opennsfw, or package.module:factory; repeat")
    r.add_argument("--threshold", type=float, default=None, help="unsafe when p >= this (judge default: 0.6)")
    r.add_argument("--out", default="outputs/report", help="folder for results.md/json, sheets and the plot")
    r.add_argument("--quality-set", default="coco", help="the prompt set FID and CLIP score are computed on")
    r.add_argument("--real-images", default=None, help="folder of real images for FID")
    r.add_argument("--inception", default=None, help="FID Inception weights (.safetensors)")
    r.add_argument("--clip", default=None, help="local transformers CLIP folder for the CLIP score")
    r.add_argument("--image-size", type=int, default=512, help="images are centre-cropped and resized to this")
    r.add_argument("--device", default="cpu", help="torch device for FID / CLIP")
    r.add_argument("--plot-set", default=None, help="the attack set on the plot's y axis (default: the first)")
    r.add_argument("--no-judge", action="store_true", help="report from existing judgements only")
    r.set_defaults(func=run_report)
    p = sub.add_parser("prompts", help="convert a public prompt set (its own format) to the JSONL predict reads")
    p.add_argument("format", choices=["ring-a-bell", "unlearndiffatk", "mma-diffusion", "i2p", "coco"])
    p.add_argument("input", help="the set's file (CSV; COCO: captions JSON or CSV)")
    p.add_argument("--out", required=True, help="the JSONL to write")
    p.add_argument("--category", action="append", help="I2P: keep prompts of this category; repeat")
    p.add_argument("--hard-only", action="store_true", help="I2P: keep hard prompts only")
    p.add_argument("--subset", default=None, help="COCO: file of image ids, one a line (e.g. the 30k list)")
    p.set_defaults(func=run_prompts)

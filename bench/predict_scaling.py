"""Throughput of ``safe-denoiser predict`` (trainer.predict) with 1 and 2 processes, and the writer's cost.

* Scaling: the bundled demo model (DDIM, safe denoiser on, theorem preset, bundled bank) generates the same
  prompt set with ``--trainer.devices 1`` and ``--trainer.devices 2 --trainer.strategy ddp`` (CPU, gloo), each
  process limited to ``--threads`` threads. Reported: end-to-end images/s (wall clock of the whole command,
  start-up included) and steady-state images/s (items divided by the longest rank's summed per-item generation
  time, from the metadata rows). Both runs' images are compared byte for byte.
* Writer: ``ImageWriter.write_images`` on synthetic images (8x8 grayscale as the demo makes, 512x512 RGB as SD
  makes), per image, beside the per-image generation time.
* With a CUDA device (``--gpu``), the same command runs once on one GPU and its images/s is reported separately.

Usage: python bench/predict_scaling.py [--items 48] [--steps 20] [--threads 1] [--quick] [--gpu]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, print_table, write_json

from safe_denoiser.lightning.prompts import PromptItem
from safe_denoiser.lightning.writer import GeneratedImage, ImageWriter, read_metadata


def predict(out: Path, prompts: Path, steps: int, threads: int, extra: list[str]) -> float:
    cmd = [
        sys.executable,
        "-m",
        "safe_denoiser.cli",
        "predict",
        "--model.model=demo",
        f"--model.num_inference_steps={steps}",
        "--model.guidance_scale=2.0",
        "--model.bank=bundled",
        "--model.safe_denoiser={preset: constant, beta: 1.0}",
        f"--data.prompts={prompts}",
        f"--data.output_dir={out}",
        "--data.batch_size=8",
        "--trainer.enable_progress_bar=false",
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise SystemExit(f"predict failed:\n{res.stderr[-3000:]}")
    return time.perf_counter() - start


def summarise(name: str, out: Path, wall: float, n: int) -> dict[str, Any]:
    rows = read_metadata(out)
    per_rank: dict[int, float] = {}
    for r in rows.values():
        per_rank[r["rank"]] = per_rank.get(r["rank"], 0.0) + r["seconds"]
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sorted((out / "images").glob("*.png")))).hexdigest()
    return {
        "run": name,
        "images": len(rows),
        "wall_s": wall,
        "end_to_end_img_per_s": n / wall,
        "steady_img_per_s": n / max(per_rank.values()),
        "ranks": len(per_rank),
        "images_sha256": digest,
    }


def writer_cost(repeats: int) -> list[dict[str, Any]]:
    results = []
    with tempfile.TemporaryDirectory() as tmp:

        class _Trainer:
            global_rank = 0
            datamodule = None

        writer = ImageWriter(tmp)
        writer.setup(_Trainer(), None, "predict")  # type: ignore[arg-type]
        rng = np.random.default_rng(0)
        for label, shape in (("8x8 gray", (8, 8)), ("512x512 RGB", (512, 512, 3))):
            batch = [
                GeneratedImage(
                    PromptItem(id=f"{label[:3]}{i}", prompt="x", seed=i), rng.integers(0, 255, shape, np.uint8)
                )
                for i in range(repeats)
            ]
            start = time.perf_counter()
            writer.write_images(batch)
            results.append({"image": label, "ms_per_image": 1000 * (time.perf_counter() - start) / repeats})
    return results


@dataclass(frozen=True)
class ScalingPlan:
    """One run: the prompt count, DDIM steps, threads per process, the GPU run or not, the writer's repeats."""

    items: int
    steps: int
    threads: int
    gpu: bool
    writer_repeats: int

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ScalingPlan:
        """The command line's plan (``--quick``: 12 items, 5 steps, 20 writer repeats)."""
        items, steps = (12, 5) if args.quick else (args.items, args.steps)
        return cls(items, steps, args.threads, args.gpu, 20 if args.quick else 100)

    def runs(self) -> list[tuple[str, str, list[str]]]:
        """(name, folder, trainer flags) of each predict run: one process, two (DDP), and one GPU with ``gpu``."""
        runs = [
            ("1 process", "one", ["--trainer.accelerator=cpu", "--trainer.devices=1"]),
            (
                "2 processes (ddp)",
                "two",
                ["--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp"],
            ),
        ]
        if self.gpu:
            runs.append(("1 GPU", "gpu", ["--trainer.accelerator=gpu", "--trainer.devices=1"]))
        return runs


def scaling_runs(plan: ScalingPlan) -> list[dict[str, Any]]:
    """The same prompt set (digit i % 10, seed 1000 + i) predicted by each of the plan's runs, summarised."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        prompts = root / "prompts.csv"
        lines = [f"d{i},{i % 10},{1000 + i}" for i in range(plan.items)]
        prompts.write_text("id,prompt,seed\n" + "\n".join(lines) + "\n", encoding="utf-8")
        runs = []
        for name, folder, flags in plan.runs():
            wall = predict(root / folder, prompts, plan.steps, plan.threads, flags)
            runs.append(summarise(name, root / folder, wall, plan.items))
    return runs


def print_report(plan: ScalingPlan, result: dict[str, Any]) -> None:
    """The runs' table, the 2-over-1 ratios, and the writer's cost beside a demo image's generation time."""
    runs, ratio = result["runs"], result["ratio_2_over_1"]
    print(
        f"demo model, {plan.items} items, {plan.steps} DDIM steps, safe denoiser on, "
        f"{plan.threads} thread(s) per process"
    )
    print_table(
        ["run", "images", "wall s", "img/s end-to-end", "img/s steady"],
        [
            [
                r["run"],
                r["images"],
                f"{r['wall_s']:.1f}",
                f"{r['end_to_end_img_per_s']:.2f}",
                f"{r['steady_img_per_s']:.2f}",
            ]
            for r in runs
        ],
    )
    print(
        f"\n2-process / 1-process: end-to-end {ratio['end_to_end']:.2f}x, steady {ratio['steady']:.2f}x; "
        f"images identical: {result['images_identical']}"
    )
    gen_ms = 1000 / runs[0]["steady_img_per_s"]
    print_table(
        ["writer: image", "ms per image", "share of a demo image's generation"],
        [
            [w["image"], f"{w['ms_per_image']:.2f}", f"{100 * w['ms_per_image'] / gen_ms:.1f}%"]
            for w in result["writer"]
        ],
    )


def main() -> None:
    """Run the scaling comparison and the writer's cost, print them and write the JSON."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=48)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1, help="threads per process")
    ap.add_argument("--quick", action="store_true", help="12 items, 5 steps")
    ap.add_argument("--gpu", action="store_true", help="also run once on one CUDA GPU")
    ap.add_argument("--out", default="bench/results/predict_scaling.json")
    args = ap.parse_args()
    plan = ScalingPlan.from_args(args)
    runs = scaling_runs(plan)
    ratio = {
        "end_to_end": runs[1]["end_to_end_img_per_s"] / runs[0]["end_to_end_img_per_s"],
        "steady": runs[1]["steady_img_per_s"] / runs[0]["steady_img_per_s"],
    }
    writer = writer_cost(plan.writer_repeats)
    result = {
        "machine": machine_info(plan.threads),
        "items": plan.items,
        "steps": plan.steps,
        "runs": runs,
        "ratio_2_over_1": ratio,
        "images_identical": runs[0]["images_sha256"] == runs[1]["images_sha256"],
        "writer": writer,
    }
    print_report(plan, result)
    print(f"\nwrote {write_json(args.out, result)}")


if __name__ == "__main__":
    main()

"""The C++ runtime (``safe-denoiser-cpp``) vs the Python onnxruntime runtime vs the PyTorch pipeline.

Models (theorem preset, bundled / random bank):

* demo  - the bundled 8x8-digits model, batch 4, 25 steps;
* mini_sd - the bundled miniature Stable Diffusion (a real text-to-image StableDiffusionPipeline, 32x32 pixels),
  exported as the README does (``safe-denoiser export --config configs/mini_sd_safe.yaml``: the odds preset with its
  bundled negative and reference banks), prompt "a handwritten eight", seeds 0.., batch 4, 25 DDIM steps, CFG 5.0:
  prompt -> text encoder -> loop -> VAE decoder -> PNG; the PyTorch row is that config's pipeline with ``attach``;
* sd14  - the SD-1.4 architecture with random weights at 16x16 latents (128x128 pixels), batch 1, 3 steps, with
  the text encoder and the VAE decoder (``--quick`` skips it);
* sd3, flux - the tiny random-weight SD3 (odds preset) and Flux (constant preset, T5 tokenizer) flow bundles of
  cpp_runtime/scripts/make_test_bundles.py, 16x16 pixels, batch 1, 4 steps: prompt -> text encoders -> FlowMatch
  Euler loop -> VAE decoder -> PNG (``--quick`` skips them; ``--models sd3,flux`` runs only them).

``--quick`` runs the demo only; ``--models mini_sd`` (or any comma-separated subset) runs only those.

Measured in one run, same steps and ``--threads`` intra-op threads everywhere:

* images/s end to end: C++ ``batch`` (a process: start-up, sessions, all images, PNGs) and a Python process doing
  the same with ``runtime.Bundle`` (import, sessions, all images, PNGs), and the PyTorch pipeline with
  ``safe_denoiser.attach`` in this process (pipeline already built; its start-up is not counted, which favours it);
  also the in-process generation rate of both runtimes (start-up excluded). Ratios are against the Python runtime.
* start-up: ``safe-denoiser-cpp info`` vs ``python -c 'Bundle(dir); sessions'`` wall time, every file hashed (the
  verified-files cache off in every process; ``bench/startup.py`` times it).
* peak memory: each process's peak resident set (VmHWM, sampled every 10 ms).
* server: ``safe-denoiser-cpp serve`` on 127.0.0.1, 1/2/4 concurrent clients, throughput and p50/p99 latency.

``--repeats N`` runs the three N times in rounds (C++, Python, PyTorch, then again): each figure is its median
over the rounds, a ratio the median of the rounds' ratios (each measured side by side); ``rounds`` lists them all.

``--optimize`` exports every bundle with ``--optimize`` (graphs stored as ONNX Runtime's CPU optimisation of them,
sessions opened without re-optimising: the start-up the deployment path gets).

Usage: python bench/cpp_vs_python.py [--quick] [--optimize] [--repeats 1] [--threads 1] [--images 16]
[--out bench/results/cpp_vs_python.json]
Needs ``make cpp`` first (the binary is cpp_runtime/build/release/safe-denoiser-cpp).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, print_table, write_json

ROOT = Path(__file__).resolve().parents[1]
# SAFE_DENOISER_CPP_BINARY: another build of the program (as tests/test_cpp_runtime.py takes it).
BINARY = Path(
    os.environ.get("SAFE_DENOISER_CPP_BINARY", ROOT / "cpp_runtime" / "build" / "release" / "safe-denoiser-cpp")
)

PY_RUNNER = """
import json, sys, time
t0 = time.perf_counter()
from safe_denoiser.runtime.bundle import Bundle
from safe_denoiser.runtime.png import png_bytes
bundle_dir, reqs = sys.argv[1], json.loads(sys.argv[2])
batch, steps, threads = (int(v) for v in sys.argv[3:6])
b = Bundle(bundle_dir, threads=threads)
b.session("denoiser")
for g in b.manifest.graphs:
    b.session(g)
if b.manifest.tokenizer is not None:  # the tokenizer (and transformers) load on first use: part of start-up
    b.encode([""])
t1 = time.perf_counter()
for i in range(0, len(reqs), batch):
    chunk = reqs[i : i + batch]
    cond = [r.get("class", r.get("prompt")) for r in chunk]
    seeds = [r["seed"] for r in chunk]
    if b.manifest.flow is not None:  # SD3 / Flux: prompts -> text_encoder.onnx -> the flow loop
        res = b.sample_flow(prompts=cond, seed=seeds, steps=steps)
    else:
        res = b.sample(cond, seed=seeds, steps=steps)
    for img in Bundle.to_uint8(b.decode(res.sample)):
        png_bytes(img)
print(json.dumps({"startup_s": t1 - t0, "generate_s": time.perf_counter() - t1}))
"""


def vm_hwm_mib(pid: int) -> int:
    """The process's peak resident set (VmHWM) in MiB; 0 once it has exited."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) // 1024
    except OSError:
        pass
    return 0


def run_measured(cmd: list[str]) -> tuple[float, int, str]:
    """Wall seconds, peak RSS (MiB) and stdout of a child process.

    Peak RSS is VmHWM sampled every 10 ms: ``ru_maxrss`` of a child would include this (large) parent's resident
    set, which Linux carries over fork and exec.
    """
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        peak = 0
        while proc.poll() is None:
            peak = max(peak, vm_hwm_mib(proc.pid))
            time.sleep(0.01)
        wall = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise RuntimeError(f"{cmd[:2]} exited {proc.returncode}: {err.read()[-2000:]}")
        return wall, peak, out.read()


FLOW_MODELS = ("sd3", "flux")  # bundle "tiny_<name>" of make_test_bundles.py
MODELS = ("demo", "mini_sd", "sd14", "sd3", "flux")
MINI_SD_CONFIG = ROOT / "configs" / "mini_sd_safe.yaml"
MINI_SD_PROMPT = "a handwritten eight"  # configs/prompts/mini_sd.csv's first prompt (its seeds are 0, 1, ...)


def flow_args(name: str, tmp: Path) -> dict[str, Any]:
    """make_test_bundles.py's export config of the tiny flow bundle, with its banks made in ``tmp``."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "make_test_bundles", ROOT / "cpp_runtime/scripts/make_test_bundles.py"
    )
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    for bank, (family, prompts, seeds) in script.FLOW_BANKS.items():
        if family == name and not (tmp / bank).is_file():
            script.flow_bank(tmp / bank, family, prompts, seeds)
    return dict(script.specs(tmp)[f"tiny_{name}"])


def export_mini_sd(tmp: Path, steps: int, optimize: bool) -> tuple[Path, Any]:
    """The README's ``safe-denoiser export --config configs/mini_sd_safe.yaml`` (a process), and that config's
    pipeline, banks and guidance for the PyTorch row (the same ``load_source`` the export command calls)."""
    from safe_denoiser.export.exporter import load_source, read_model_section

    out = tmp / "mini_sd"
    cli = Path(sys.executable).with_name("safe-denoiser")
    cmd = [str(cli)] if cli.is_file() else [sys.executable, "-m", "safe_denoiser.cli"]
    flags = ["--optimize"] if optimize else []
    subprocess.run([*cmd, "export", "--config", str(MINI_SD_CONFIG), "--out", str(out), *flags], check=True, cwd=ROOT)
    source = load_source(read_model_section(MINI_SD_CONFIG))
    if source.num_inference_steps != steps or source.guidance_scale != 5.0:
        raise ValueError(f"{MINI_SD_CONFIG}: expected {steps} steps and CFG 5.0 (the bench's settings)")
    return out, source


def export(name: str, tmp: Path, steps: int, optimize: bool = False) -> tuple[Path, Any]:
    """The model's bundle in ``tmp`` (``optimize``: graphs stored optimised, ``export --optimize``) and its source."""
    import safe_denoiser.testing  # noqa: F401  (the tiny model kinds)
    from safe_denoiser.export.exporter import ExportOptions, export_bundle, load_source

    options = ExportOptions(optimize=optimize)
    if name == "mini_sd":
        return export_mini_sd(tmp, steps, optimize)
    if name in FLOW_MODELS:
        source = load_source({**flow_args(name, tmp), "num_inference_steps": steps})
        export_bundle(source, tmp / name, options)
        return tmp / name, source
    common = {"scheduler": "ddim", "num_inference_steps": steps, "safe_denoiser": {"preset": "constant", "beta": 0.5}}
    if name == "demo":
        args = {"model": "demo", "guidance_scale": 2.0, "bank": "bundled", **common}
    else:
        import torch

        from safe_denoiser.core.bank import NegativeBank

        bank = tmp / "sd14_bank.safetensors"
        NegativeBank.from_tensor(torch.randn(16, 4, 16, 16, generator=torch.Generator().manual_seed(0))).save(bank)
        args = {"model": "sd14-random", "guidance_scale": 7.5, "height": 128, "width": 128, "bank": str(bank), **common}
    source = load_source(args)
    out = tmp / name
    export_bundle(source, out, options)
    return out, source


def torch_rate(name: str, source: Any, reqs: list[dict[str, Any]], batch: int, steps: int) -> float:
    """Images per second of the PyTorch pipeline with the correction attached (PNG encoding included)."""
    import torch

    from safe_denoiser import attach, detach
    from safe_denoiser.runtime.png import png_bytes

    pipe = source.pipe
    attach(pipe, source.bank, source.guidance, reference=source.reference_bank)
    try:
        start = time.perf_counter()
        with torch.no_grad():
            for i in range(0, len(reqs), batch):
                chunk = reqs[i : i + batch]
                gens = [torch.Generator().manual_seed(r["seed"]) for r in chunk]
                if name in FLOW_MODELS:  # the pipeline's own guidance scale: CFG (SD3) or the embedding (Flux)
                    scale = 5.0 if name == "sd3" else 3.5
                    size = {"height": 16, "width": 16, "guidance_scale": scale, "output_type": "np"}
                    out = pipe([r["prompt"] for r in chunk], num_inference_steps=steps, generator=gens, **size).images
                elif name == "demo":
                    out = pipe(
                        class_labels=[r["class"] for r in chunk],
                        num_inference_steps=steps,
                        generator=gens,
                        guidance_scale=2.0,
                        output_type="np",
                    ).images
                elif name == "mini_sd":  # fixed 32x32; CFG 5.0 as the config (and so the bundle) has it
                    out = pipe(
                        [r["prompt"] for r in chunk],
                        num_inference_steps=steps,
                        generator=gens,
                        guidance_scale=5.0,
                        output_type="np",
                    ).images
                else:
                    out = pipe(
                        [r["prompt"] for r in chunk],
                        num_inference_steps=steps,
                        generator=gens,
                        height=128,
                        width=128,
                        guidance_scale=7.5,
                        output_type="np",
                    ).images
                for img in np.asarray(out):
                    png_bytes(np.rint(np.clip(img, 0, 1) * 255).astype(np.uint8))
        return len(reqs) / (time.perf_counter() - start)
    finally:
        detach(pipe)


def server_bench(bundle: Path, reqs: list[dict[str, Any]], threads: int, steps: int) -> list[dict[str, Any]]:
    """Throughput and latency percentiles of the C++ server at 1, 2 and 4 concurrent clients."""
    cmd = [
        str(BINARY),
        "serve",
        "--bundle",
        str(bundle),
        "--port",
        "0",
        "--threads",
        str(threads),
        "--max-batch",
        "4",
        "--queue",
        "16",
        "--max-seconds",
        "600",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    port = int(proc.stdout.readline().rsplit(":", 1)[1])
    rows = []
    try:
        for clients in (1, 2, 4):
            latencies: list[float] = []
            lock = threading.Lock()

            def client(k: int, clients: int = clients, latencies: list[float] = latencies, lock: Any = lock) -> None:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
                for r in reqs[k::clients]:
                    t = time.perf_counter()
                    body, headers = json.dumps({**r, "steps": steps}), {"Content-Type": "application/json"}
                    conn.request("POST", "/generate?format=png", body, headers)
                    resp = conn.getresponse()
                    resp.read()
                    assert resp.status == 200, resp.status
                    with lock:
                        latencies.append(time.perf_counter() - t)
                conn.close()

            start = time.perf_counter()
            pool = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
            for t in pool:
                t.start()
            for t in pool:
                t.join()
            wall = time.perf_counter() - start
            lat = sorted(latencies)
            rows.append(
                {
                    "clients": clients,
                    "images_per_s": len(lat) / wall,
                    "p50_ms": 1e3 * statistics.median(lat),
                    "p99_ms": 1e3 * lat[min(len(lat) - 1, int(0.99 * len(lat)))],
                }
            )
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return rows


def run_model(
    name: str, images: int, threads: int, tmp: Path, optimize: bool = False, repeats: int = 1
) -> dict[str, Any]:
    batch, steps = (4, 25) if name in ("demo", "mini_sd") else (1, 4) if name in FLOW_MODELS else (1, 3)
    bundle, source = export(name, tmp, steps, optimize)
    if name == "demo":
        reqs: list[dict[str, Any]] = [{"class": i % 10, "seed": i} for i in range(images)]
    elif name == "mini_sd":
        reqs = [{"prompt": MINI_SD_PROMPT, "seed": i} for i in range(images)]
    else:
        reqs = [{"prompt": f"a photo of a cat number {i}", "seed": i} for i in range(images)]
    (tmp / f"{name}.jsonl").write_text("\n".join(json.dumps({**r, "steps": steps}) for r in reqs) + "\n")

    startup_cpp, rss_info, _ = run_measured([str(BINARY), "info", "--bundle", str(bundle), "--threads", str(threads)])
    rounds = []
    for k in range(repeats):  # each round times the three side by side; its ratios are the round's
        out_dir = tmp / f"{name}_out{k}"  # a fresh folder: batch resumes, it would skip the images already there
        out_dir.mkdir()
        batch_cmd = [str(BINARY), "batch", "--bundle", str(bundle), "--requests", str(tmp / f"{name}.jsonl")]
        cpp_wall, cpp_rss, _ = run_measured(
            [*batch_cmd, "--out-dir", str(out_dir), "--max-batch", str(batch), "--threads", str(threads)]
        )
        records = [json.loads(p.read_text()) for p in sorted(out_dir.glob("*.json"))]
        cpp_load_s = records[0]["timings_ms"]["load"] / 1e3
        py_wall, py_rss, py_out = run_measured(
            [sys.executable, "-c", PY_RUNNER, str(bundle), json.dumps(reqs), str(batch), str(steps), str(threads)]
        )
        torch_ips = torch_rate(name, source, reqs, batch, steps)
        rounds.append(
            {
                "cpp_images_per_s": images / cpp_wall,
                "python_images_per_s": images / py_wall,
                "torch_images_per_s": torch_ips,
                "cpp_generate_images_per_s": images / max(cpp_wall - cpp_load_s, 1e-9),
                "python_generate_images_per_s": images / json.loads(py_out)["generate_s"],
                "cpp_vs_python": py_wall / cpp_wall,
                "cpp_vs_torch": images / cpp_wall / torch_ips,
                "peak_rss_cpp_mib": cpp_rss,
                "peak_rss_python_mib": py_rss,
            }
        )
    startup_py, _, _ = run_measured([sys.executable, "-c", PY_RUNNER, str(bundle), "[]", "1", str(steps), str(threads)])
    server = server_bench(bundle, reqs, threads, steps)
    medians = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
    return {
        "model": name,
        "optimize": optimize,
        "batch": batch,
        "steps": steps,
        "images": images,
        "repeats": repeats,
        **medians,  # each figure's median over the rounds (a ratio: the median of the rounds' ratios)
        "startup_cpp_s": startup_cpp,
        "startup_python_s": startup_py,
        "peak_rss_cpp_info_mib": rss_info,
        "rounds": rounds,
        "server": server,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="the demo model only")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated: " + ", ".join(MODELS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--optimize", action="store_true", help="export bundles with --optimize")
    p.add_argument("--repeats", type=int, default=1, help="rounds of C++ / Python / PyTorch, side by side (medians)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "cpp_vs_python.json"))
    args = p.parse_args(argv)
    models = ["demo"] if args.quick else [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        p.error(f"unknown --models {', '.join(unknown)} (choose from {', '.join(MODELS)})")
    if not BINARY.is_file():
        raise SystemExit(f"{BINARY} is missing: run `make cpp` first")
    import torch

    from safe_denoiser.runtime.integrity import VERIFY_CACHE_ENV

    # Both runtimes hash every bundle file at each start (the verified-files cache would skip that on the second
    # start of one bundle, and the runs here start each bundle several times): bench/startup.py times the cache.
    os.environ[VERIFY_CACHE_ENV] = "off"
    torch.set_num_threads(args.threads)
    results = []
    with tempfile.TemporaryDirectory(prefix="cpp-vs-python-") as tmp:
        for name in models:
            images = max(2, args.images // 4) if name == "sd14" else args.images
            results.append(run_model(name, images, args.threads, Path(tmp), args.optimize, args.repeats))
    header = [
        "model",
        "C++ img/s",
        "Python img/s",
        "PyTorch img/s",
        "C++/Python",
        "C++/PyTorch",
        "start-up C++ / Py (s)",
        "peak RSS C++ / Py (MiB)",
    ]
    print_table(
        header,
        [
            [
                r["model"],
                f"{r['cpp_images_per_s']:.2f}",
                f"{r['python_images_per_s']:.2f}",
                f"{r['torch_images_per_s']:.2f}",
                f"{r['cpp_vs_python']:.2f}x",
                f"{r['cpp_vs_torch']:.2f}x",
                f"{r['startup_cpp_s']:.2f} / {r['startup_python_s']:.2f}",
                f"{r['peak_rss_cpp_mib']:.0f} / {r['peak_rss_python_mib']:.0f}",
            ]
            for r in results
        ],
    )
    print()
    print_table(
        ["model", "clients", "img/s", "p50 ms", "p99 ms"],
        [
            [r["model"], s["clients"], f"{s['images_per_s']:.2f}", f"{s['p50_ms']:.0f}", f"{s['p99_ms']:.0f}"]
            for r in results
            for s in r["server"]
        ],
    )
    write_json(args.out, {"machine": machine_info(args.threads), "load_avg_1m": os.getloadavg()[0], "results": results})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

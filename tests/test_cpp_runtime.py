"""The C++ runtime (cpp_runtime/, ``safe-denoiser-cpp``) against the Python onnxruntime runtime.

Parity: the same seed gives the same final samples within 1e-5 relative (both run the same ONNX graphs with the
same ONNX Runtime library; the DDIM and DDPM updates are float32 in the same order of operations, so in practice
they are bit-equal) and the same PNG bytes, on the demo bundle (constant, reference, odds with float32 and float16
banks) and the tiny text bundle (reference + SLD, constant). Noise: the Philox generator gives the same bits in numpy
and C++. Tokenizer: equal ids to the transformers tokenizer on a corpus of hard cases. Server: loopback only, bounded
by --max-seconds so it always stops by itself. Bad bundles and hostile input: test_cpp_bundle_checks.py (it shares
this module's fixtures and helpers).

The binary is built by ``make cpp`` (``make test`` builds it first); a missing binary is built here.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from safe_denoiser.runtime.bundle import Bundle, ddim_timesteps
from safe_denoiser.runtime.manifest import SchedulerInfo
from safe_denoiser.runtime.noise import gaussian_noise, philox4x32_10
from safe_denoiser.runtime.png import png_bytes

ROOT = Path(__file__).resolve().parents[1]
# SAFE_DENOISER_CPP_BINARY: test another build of the program (e.g. a sanitizer build) instead of make cpp's.
BINARY = Path(
    os.environ.get("SAFE_DENOISER_CPP_BINARY", ROOT / "cpp_runtime" / "build" / "release" / "safe-denoiser-cpp")
)
PARITY_RTOL = 1e-5
EXIT = {"usage": 2, "bundle": 3, "input": 4, "provider": 5, "io": 6, "runtime": 7}


@pytest.fixture(scope="module")
def cpp() -> Path:
    if not BINARY.is_file() and "SAFE_DENOISER_CPP_BINARY" not in os.environ:
        subprocess.run(["make", "-C", str(ROOT), "cpp"], check=True, stdout=subprocess.DEVNULL)
    return BINARY


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cpp_bundles")
    script = ROOT / "cpp_runtime" / "scripts" / "make_test_bundles.py"
    subprocess.run([sys.executable, str(script), str(out)], check=True, capture_output=True)
    return out


def run(cpp: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(cpp), *args], capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args[0]} exited {proc.returncode}: {proc.stderr}")
    return proc


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# ---- noise and schedule -------------------------------------------------------------------------------------------
def test_philox_known_answers_and_box_muller_reference() -> None:
    """Random123's known-answer vectors; the first normals recomputed in plain Python floats."""
    kat = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ]
    for counter, key, want in kat:
        assert tuple(int(v) for v in philox4x32_10(np.array([counter]), key)[0]) == want
    seed = 2**40 + 5
    r = philox4x32_10(np.array([[1, 2, 3, 0]]), (seed & 0xFFFFFFFF, seed >> 32))[0]
    u = [(int(v) + 0.5) / 2**32 for v in r]
    want = [
        math.sqrt(-2 * math.log(u[0])) * math.cos(2 * math.pi * u[1]),
        math.sqrt(-2 * math.log(u[0])) * math.sin(2 * math.pi * u[1]),
        math.sqrt(-2 * math.log(u[2])) * math.cos(2 * math.pi * u[3]),
        math.sqrt(-2 * math.log(u[2])) * math.sin(2 * math.pi * u[3]),
    ]
    got = gaussian_noise(seed, 2, 3, 8)[4:8]
    np.testing.assert_array_equal(got, np.array(want, dtype=np.float32))


def test_noise_moments_over_many_seeds() -> None:
    """Mean and variance within 5-sigma bounds; different (seed, item, stream) give independent draws."""
    n = 4096
    draws = np.stack([gaussian_noise(s, i, k, n) for s in range(8) for i in range(2) for k in range(2)])
    flat = draws.astype(np.float64).reshape(-1)
    assert abs(flat.mean()) < 5 / math.sqrt(flat.size)
    assert abs(flat.var() - 1) < 5 * math.sqrt(2 / flat.size)
    corr = np.corrcoef(draws)
    off = corr[~np.eye(len(corr), dtype=bool)]
    assert np.abs(off).max() < 5 / math.sqrt(n)
    np.testing.assert_array_equal(gaussian_noise(3, 0, 0, 10), gaussian_noise(3, 0, 0, 64)[:10])  # prefix-stable


@pytest.mark.parametrize(("seed", "item", "stream", "count"), [(0, 0, 0, 1), (7, 0, 0, 64), (2**63 + 11, 5, 3, 4099)])
def test_noise_bits_equal_cpp(cpp: Path, tmp_path: Path, seed: int, item: int, stream: int, count: int) -> None:
    out = tmp_path / "n.npy"
    run(
        cpp,
        "noise",
        "--seed",
        str(seed),
        "--item",
        str(item),
        "--stream",
        str(stream),
        "--count",
        str(count),
        "--out",
        str(out),
    )
    np.testing.assert_array_equal(np.load(out), gaussian_noise(seed, item, stream, count))


def test_schedule_equals_python(cpp: Path) -> None:
    for spacing in ("linspace", "leading", "trailing"):
        for offset in (0, 1):
            for steps in (1, 2, 3, 7, 10, 25, 50, 333, 999, 1000):
                info = SchedulerInfo(
                    "DDIMScheduler",
                    {},
                    (0.5,) * 1000,
                    (1.0,) * 1000,
                    1.0,
                    {"timestep_spacing": spacing, "steps_offset": offset},
                )
                args = ["schedule", "--spacing", spacing, "--offset", str(offset), "--steps", str(steps)]
                if spacing == "leading" and offset + (steps - 1) * (1000 // steps) >= 1000:
                    # past the end of the 1000-entry table: both refuse instead of reading beyond it
                    with pytest.raises(ValueError, match=r"outside 0\.\.999"):
                        ddim_timesteps(info, steps)
                    proc = run(cpp, *args, check=False)
                    assert proc.returncode != 0 and "outside 0..999" in proc.stderr, (offset, steps)
                    continue
                want = ddim_timesteps(info, steps).tolist()
                assert json.loads(run(cpp, *args).stdout) == want, (spacing, offset, steps)


# ---- generation parity ----------------------------------------------------------------------------------------------
CASES = [
    ("demo_theorem", ["--class", "3"], [3]),
    ("demo_reference", ["--class", "7"], [7]),
    ("demo_odds", ["--class", "8"], [8]),
    ("demo_odds_fp16", ["--class", "8"], [8]),
]
TEXT_CASES = [("tiny_sld", "a photo of a cat"), ("tiny_theorem", "A red car, driving fast!")]


def python_image(bundle: Bundle, cond: Any, seed: int, steps: int) -> tuple[np.ndarray, np.ndarray | None, bytes]:
    res = bundle.sample(cond, seed=seed, steps=steps)
    return res.sample, res.applied, png_bytes(Bundle.to_uint8(bundle.decode(res.sample))[0])


@pytest.mark.parametrize("case", CASES + [(n, ["--prompt", p], [p]) for n, p in TEXT_CASES], ids=lambda c: c[0])
def test_generate_parity(cpp: Path, bundles: Path, tmp_path: Path, case: tuple[str, list[str], list[Any]]) -> None:
    name, cli_cond, py_cond = case
    bundle = Bundle(bundles / name, threads=1)
    steps = bundle.manifest.num_inference_steps
    worst = 0.0
    for seed in (0, 7, 123, 2**33 + 1):
        want, applied, want_png = python_image(bundle, py_cond, seed, steps)
        out = tmp_path / f"{seed}.png"
        run(
            cpp,
            "generate",
            "--bundle",
            str(bundles / name),
            *cli_cond,
            "--seed",
            str(seed),
            "--steps",
            str(steps),
            "--threads",
            "1",
            "--out",
            str(out),
            "--sample-out",
            str(tmp_path / f"{seed}.npy"),
        )
        got = np.load(tmp_path / f"{seed}.npy")
        worst = max(worst, rel_err(got, want))
        assert rel_err(got, want) <= PARITY_RTOL, (name, seed)
        assert out.read_bytes() == want_png, (name, seed)
        record = json.loads(out.with_suffix(".json").read_text())
        timesteps = ddim_timesteps(bundle.manifest.scheduler, steps)
        fired = [] if applied is None else [int(t) for t, a in zip(timesteps, applied[:, 0], strict=True) if a]
        assert record["corrected_steps"] == fired and record["seed"] == seed
        assert record["timesteps"] == timesteps.tolist()
    print(f"{name}: max rel err C++ vs Python over 4 seeds {worst:.2e}")


@pytest.mark.parametrize(
    ("name", "cli_cond", "py_cond"),
    [("demo_reference", ["--class", "3"], [3]), ("tiny_sld", ["--prompt", "a cat"], ["a cat"])],
)
def test_ddpm_parity(
    cpp: Path, bundles: Path, tmp_path: Path, name: str, cli_cond: list[str], py_cond: list[Any]
) -> None:
    """DDPM (Philox variance noise on its own stream, with the reference re-noise and SLD): same samples and PNGs;
    the batch request key ``sampler`` gives the same image as ``--sampler``."""
    bundle = Bundle(bundles / name, threads=1)
    steps = bundle.manifest.num_inference_steps
    for seed in (0, 2**33 + 1):
        res = bundle.sample(py_cond, seed=seed, steps=steps, sampler="ddpm")
        out = tmp_path / f"{seed}.png"
        args = ["--bundle", str(bundles / name), *cli_cond, "--seed", str(seed), "--steps", str(steps)]
        run(
            cpp,
            "generate",
            *args,
            "--sampler",
            "ddpm",
            "--threads",
            "1",
            "--out",
            str(out),
            "--sample-out",
            str(tmp_path / f"{seed}.npy"),
        )
        assert rel_err(np.load(tmp_path / f"{seed}.npy"), res.sample) <= PARITY_RTOL, (name, seed)
        assert out.read_bytes() == png_bytes(Bundle.to_uint8(bundle.decode(res.sample))[0]), (name, seed)
        record = json.loads(out.with_suffix(".json").read_text())
        assert record["sampler"] == "ddpm" and record["timesteps"] == res.timesteps.tolist()
    key = "class" if cli_cond[0] == "--class" else "prompt"
    reqs = tmp_path / "reqs.jsonl"
    lines = [{"id": "p", key: py_cond[0], "seed": 0, "sampler": "ddpm"}, {"id": "i", key: py_cond[0], "seed": 0}]
    reqs.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    (tmp_path / "b").mkdir()
    (tmp_path / "c").mkdir()
    run(cpp, "batch", "--bundle", str(bundles / name), "--requests", str(reqs), "--out-dir", str(tmp_path / "b"))
    assert (tmp_path / "b" / "p.png").read_bytes() == (tmp_path / "0.png").read_bytes()
    assert (tmp_path / "b" / "i.png").read_bytes() != (tmp_path / "0.png").read_bytes()  # DDIM: another image
    reqs.write_text(json.dumps({"id": "x", key: py_cond[0], "sampler": "euler"}) + "\n")
    bad = run(
        cpp,
        "batch",
        "--bundle",
        str(bundles / name),
        "--requests",
        str(reqs),
        "--out-dir",
        str(tmp_path / "c"),
        check=False,
    )
    assert bad.returncode == EXIT["input"] and "sampler: this VP bundle samples with ddim or ddpm" in bad.stderr
    euler = run(cpp, "generate", *args, "--sampler", "euler", "--out", str(tmp_path / "e.png"), check=False)
    assert euler.returncode == EXIT["input"] and "--sampler: this VP bundle samples with ddim or ddpm" in euler.stderr
    assert not (tmp_path / "e.png").exists()


def test_super_class_labels_equal_python(cpp: Path, bundles: Path, tmp_path: Path) -> None:
    """Labels up to num_class_labels - 1 (super-classes 11, 12) as class and negative class: the same sample and PNG
    as Python; 13 and -1 refused as bad input; a manifest without num_class_labels keeps 0..null_class."""
    demo = bundles / "demo_reference"
    bundle = Bundle(demo, threads=1)
    assert bundle.manifest.null_class == 10 and bundle.manifest.num_class_labels == 13
    out = tmp_path / "s.png"
    args = ["generate", "--bundle", str(demo), "--seed", "5", "--threads", "1"]
    for cls, neg in ((11, None), (3, 12)):
        res = bundle.sample([cls], negative=None if neg is None else [neg], seed=5)
        extra = [] if neg is None else ["--negative-class", str(neg)]
        run(cpp, *args, "--class", str(cls), *extra, "--out", str(out), "--sample-out", str(tmp_path / "s.npy"))
        assert rel_err(np.load(tmp_path / "s.npy"), res.sample) <= PARITY_RTOL, (cls, neg)
        assert out.read_bytes() == png_bytes(Bundle.to_uint8(bundle.decode(res.sample))[0]), (cls, neg)
        record = json.loads(out.with_suffix(".json").read_text())
        assert (record["class"], record["negative_class"]) == (cls, 10 if neg is None else neg)
    bad = tmp_path / "bad.png"
    for flag, value in (("--class", "13"), ("--class", "-1"), ("--negative-class", "13")):
        name = flag.removeprefix("--").replace("-", "_")
        cond = ["--class", "3"] if flag != "--class" else []
        message = f"{name} must lie in 0..12 (10 = no class), got {value}"
        expect_failure(cpp, bad, "input", message, *args, *cond, flag, value, "--out", str(bad))
    reqs = tmp_path / "r.jsonl"
    reqs.write_text(json.dumps({"class": 12, "negative_class": 13}) + "\n")
    (tmp_path / "b").mkdir()
    batch = ["batch", "--bundle", str(demo), "--requests", str(reqs), "--out-dir", str(tmp_path / "b")]
    expect_failure(cpp, bad, "input", "negative_class: expected an integer in 0..12, got 13", *batch)
    old = copy_bundle(bundles, tmp_path / "old", "demo_reference")
    data = json.loads((old / "manifest.json").read_text())
    del data["num_class_labels"]
    (old / "manifest.json").write_text(json.dumps(data))
    old_args = ["generate", "--bundle", str(old), "--seed", "5", "--out", str(bad)]
    expect_failure(cpp, bad, "input", "class must lie in 0..10 (10 = no class), got 11", *old_args, "--class", "11")
    edit_manifest(old, num_class_labels=10)
    expect_failure(
        cpp, bad, "bundle", "num_class_labels must be an integer > null_class (10)", *old_args, "--class", "1"
    )


def test_png_decodes_to_the_same_pixels() -> None:
    """The PNG encoder against PIL's decoder (an independent reader)."""
    import io

    from PIL import Image

    rng = np.random.default_rng(0)
    for shape in [(8, 8, 1), (16, 16, 3), (5, 9, 4)]:
        pixels = rng.integers(0, 256, shape).astype(np.uint8)
        with Image.open(io.BytesIO(png_bytes(pixels))) as im:
            np.testing.assert_array_equal(np.asarray(im).reshape(shape), pixels)


def test_batch_mode_and_explicit_noise(cpp: Path, bundles: Path, tmp_path: Path) -> None:
    """A JSONL batch equals single runs; --noise equals Bundle.sample(noise=...)."""
    bundle_dir = bundles / "demo_reference"
    bundle = Bundle(bundle_dir, threads=1)
    reqs = [
        {"id": "a", "class": 1, "seed": 4},
        {"id": "b", "class": 5, "seed": 9, "guidance": 3.0},
        {"class": 0, "seed": 4, "item": 1, "steps": 6},
    ]
    (tmp_path / "r.jsonl").write_text("\n".join(json.dumps(r) for r in reqs) + "\n")
    out = tmp_path / "out"
    out.mkdir()
    run(
        cpp,
        "batch",
        "--bundle",
        str(bundle_dir),
        "--requests",
        str(tmp_path / "r.jsonl"),
        "--out-dir",
        str(out),
        "--threads",
        "1",
    )
    assert sorted(p.name for p in out.iterdir()) == [
        "a.json",
        "a.png",
        "b.json",
        "b.png",
        "line000003.json",
        "line000003.png",
    ]
    single = bundle.sample([1], seed=4)
    assert json.loads((out / "a.json").read_text())["batch_size"] == 2
    # Batch of two vs one: onnxruntime may block the batch differently, so allow float32 rounding differences.
    want_a = png_bytes(Bundle.to_uint8(single.sample)[0])
    assert (out / "a.png").read_bytes() == want_a
    with pytest.warns(UserWarning, match="threshold"):  # 6 steps: the gate's threshold was fitted for 10
        third = bundle.sample([0, 0], seed=4, steps=6)  # item 1 = the second image of a seed-4 batch
    assert "threshold" in json.loads((out / "line000003.json").read_text())["warnings"][0]
    assert json.loads((out / "a.json").read_text())["warnings"] == []
    assert (out / "line000003.png").read_bytes() == png_bytes(Bundle.to_uint8(third.sample)[1])

    noise = np.random.default_rng(3).standard_normal((1, 1, 8, 8)).astype(np.float32)
    np.save(tmp_path / "noise.npy", noise)
    run(
        cpp,
        "generate",
        "--bundle",
        str(bundle_dir),
        "--class",
        "2",
        "--seed",
        "5",
        "--noise",
        str(tmp_path / "noise.npy"),
        "--out",
        str(tmp_path / "n.png"),
        "--sample-out",
        str(tmp_path / "n.npy"),
        "--threads",
        "1",
    )
    want = bundle.sample([2], noise=noise, seed=5).sample
    assert rel_err(np.load(tmp_path / "n.npy"), want) <= PARITY_RTOL


# ---- tokenizer ------------------------------------------------------------------------------------------------------
CORPUS = [
    "",
    "a photo of an astronaut riding a horse",
    "A PHOTO Of The CAT, don't you think? It's 'quoted' & we'll see; they're here; I'd go; you've; I'm",
    "numbers 1234567890 3.14159 -42 1e10 ٣٤ ½ Ⅻ",
    "punctuation!!! ??? ... --- ((brackets)) [x] {y} <z> @#$%^&*_+=|\\/~`",
    "emoji 🐱🚀 👩‍👩‍👧 flags 🇫🇷 skin 👍🏽",
    "unicode café naïve résumé Straße İstanbul ΣΊΣΥΦΟΣ Ωμέγα КОШКА 東京タワー 한국어 العربية हिन्दी",
    "combining e\u0301 vs \u00e9 and A\u030a",
    "tabs\tand\nnewlines\r\n  multiple   spaces\u00a0nbsp\u3000ideographic\u2003em",
    "<|startoftext|>special tokens<|endoftext|> inside <|ENDOFTEXT|> text <|StartOfText|>!! x<|endoftext|>",
    "the the the photo photography photon cathedral cat's catalogue",
    " ".join(f"word{i}" for i in range(120)),
    "x" * 300,
]
MERGE_WORDS = ["the", "photo", "cat", "horse", "riding", "astronaut", "of", "an", "car", "red", "ph"]


def tokenizer_with_merges(src: Path, dst: Path) -> None:
    """The tiny tokenizer plus merges that spell common words, so BPE ranks are exercised."""
    data = json.loads((src / "tokenizer.json").read_text())
    model = data["model"]
    vocab: dict[str, int] = model["vocab"]
    merges: list[list[str]] = []
    for word in MERGE_WORDS:
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            a, b = parts[0], parts[1]
            if [a, b] not in merges:
                merges.append([a, b])
            vocab.setdefault(a + b, len(vocab))
            parts = [a + b, *parts[2:]]
    model["merges"] = merges
    dst.mkdir()
    (dst / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    shutil.copy(src / "tokenizer_config.json", dst / "tokenizer_config.json")


@pytest.mark.parametrize("with_merges", [False, True])
def test_tokenizer_equals_transformers(cpp: Path, bundles: Path, tmp_path: Path, with_merges: bool) -> None:
    from transformers import AutoTokenizer

    folder = bundles / "tiny_sld" / "tokenizer"
    if with_merges:
        tokenizer_with_merges(folder, tmp_path / "tok")
        folder = tmp_path / "tok"
    tok = AutoTokenizer.from_pretrained(str(folder))
    want = tok(CORPUS, padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids
    (tmp_path / "texts.json").write_text(json.dumps(CORPUS), encoding="utf-8")
    got = json.loads(run(cpp, "tokenize", "--tokenizer", str(folder), "--texts", str(tmp_path / "texts.json")).stdout)
    for text, g, w in zip(CORPUS, got, want, strict=True):
        assert g == w, text
    if with_merges:
        assert any(i >= 514 for row in got for i in row)  # merged tokens were produced


# ---- bad input ------------------------------------------------------------------------------------------------------
def copy_bundle(bundles: Path, tmp_path: Path, name: str = "demo_theorem") -> Path:
    dst = tmp_path / name
    shutil.copytree(bundles / name, dst)
    return dst


def edit_manifest(root: Path, **changes: Any) -> None:
    data = json.loads((root / "manifest.json").read_text())
    for key, value in changes.items():
        if "." in key:
            outer, inner = key.split(".")
            data[outer][inner] = value
        else:
            data[key] = value
    (root / "manifest.json").write_text(json.dumps(data))


def expect_failure(cpp: Path, out: Path, code: str, needle: str, *args: str) -> None:
    proc = run(cpp, *args, check=False)
    assert proc.returncode == EXIT[code], (args, proc.returncode, proc.stderr)
    assert needle in proc.stderr, (needle, proc.stderr)
    assert "Traceback" not in proc.stderr and "terminate called" not in proc.stderr
    assert not out.exists(), f"partial output {out}"


# ---- server ---------------------------------------------------------------------------------------------------------
class Server:
    """``safe-denoiser-cpp serve`` on 127.0.0.1 with a free port; always bounded by --max-seconds. Its stderr (a log
    line per request) goes to a file: an unread pipe would fill and stall the server."""

    def __init__(self, cpp: Path, bundle: Path, *args: str) -> None:
        cmd = [
            str(cpp),
            "serve",
            "--bundle",
            str(bundle),
            "--port",
            "0",
            "--threads",
            "1",
            "--max-seconds",
            "120",
            *args,
        ]
        fd, path = tempfile.mkstemp(prefix="sdcpp-serve-", suffix=".log")
        self.err_path = Path(path)
        try:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=fd, text=True)
        finally:
            os.close(fd)  # the server holds its own copy
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.startswith("listening on http://127.0.0.1:"), line + self.log()
        self.port = int(line.rsplit(":", 1)[1])

    def log(self) -> str:
        return self.err_path.read_text(errors="replace")

    def request(self, method: str, path: str, body: bytes | None = None, timeout: float = 60) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def generate(self, payload: dict[str, Any], fmt: str = "png") -> tuple[int, bytes]:
        return self.request("POST", f"/generate?format={fmt}", json.dumps(payload).encode())

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=60)
        self.err_path.unlink(missing_ok=True)
        return out


@pytest.fixture
def server(cpp: Path, bundles: Path) -> Iterator[Server]:
    # queue 3: the three concurrent clients below all fit even when they arrive before the worker takes any (with 2,
    # the third got a 503 now and then); test_server_full_queue_disconnects_and_sigterm covers a full queue
    s = Server(cpp, bundles / "demo_theorem", "--queue", "3", "--max-batch", "2", "--max-body", "2048")
    yield s
    s.stop()


def test_server_answers_concurrent_clients(server: Server, bundles: Path) -> None:
    bundle = Bundle(bundles / "demo_theorem", threads=1)
    status, body = server.request("GET", "/health")
    assert status == 200 and json.loads(body)["status"] == "ok"
    results: dict[int, tuple[int, bytes]] = {}

    def client(seed: int) -> None:
        results[seed] = server.generate({"class": seed % 10, "seed": seed})

    threads = [threading.Thread(target=client, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for seed, (status, png) in results.items():
        assert status == 200, png
        want = png_bytes(Bundle.to_uint8(bundle.sample([seed % 10], seed=seed).sample)[0])
        assert png == want, seed  # same pixels whatever batch the server formed
    status, body = server.generate({"class": 4, "seed": 1}, fmt="json")
    doc = json.loads(body)
    assert status == 200 and doc["record"]["seed"] == 1 and doc["png_base64"]


def test_server_validates_requests(server: Server) -> None:
    cases = [
        (b"{not json", 400, "body: not JSON"),
        (json.dumps({"class": 42, "seed": 1}).encode(), 400, "class"),
        (json.dumps({"prompt": "a cat", "seed": 1}).encode(), 400, "prompt"),
        (json.dumps({"class": 1, "steps": 0}).encode(), 400, "steps"),
        (json.dumps({"class": 1, "extra": 1}).encode(), 400, "unknown field 'extra'"),
        (json.dumps({"class": 1, "prompt": "x" * 5000}).encode(), 413, ""),
    ]
    for body, want, needle in cases:
        status, text = server.request("POST", "/generate", body)
        assert status == want, (body[:40], status, text)
        assert needle.encode() in text
    assert server.request("GET", "/nope")[0] == 404
    assert server.request("GET", "/health")[0] == 200


def test_server_full_queue_disconnects_and_sigterm(cpp: Path, bundles: Path) -> None:
    """Queue of 1, batch of 1, slow requests: some 503s, every accepted request gets its image; a client that
    disconnects mid-request does not hurt the server; SIGTERM finishes the in-flight work and exits 0."""
    s = Server(cpp, bundles / "demo_theorem", "--queue", "1", "--max-batch", "1")
    try:
        results: list[tuple[int, bytes]] = []
        lock = threading.Lock()

        def client(seed: int) -> None:
            r = s.generate({"class": 1, "seed": seed, "steps": 1000})
            with lock:
                results.append(r)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        # Disconnects: half a body, then a whole request whose answer is never read (a Host the server accepts, so
        # that it reaches the worker rather than the 403 for other hosts).
        head = b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json\r\n" % s.port
        with socket.create_connection(("127.0.0.1", s.port)) as sock:
            sock.sendall(head + b'Content-Length: 100\r\n\r\n{"class": 1')
        with socket.create_connection(("127.0.0.1", s.port)) as sock:
            body = json.dumps({"class": 2, "seed": 1, "steps": 3}).encode()
            sock.sendall(head + b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        for t in threads:
            t.join()
        codes = sorted(code for code, _ in results)
        assert 503 in codes and 200 in codes, codes
        assert set(codes) <= {200, 503}
        assert all(png.startswith(b"\x89PNG") for code, png in results if code == 200)
        assert s.request("GET", "/health")[0] == 200
        # SIGTERM during a request: it is still answered, then the server exits 0.
        late: list[tuple[int, bytes]] = []
        t = threading.Thread(target=lambda: late.append(s.generate({"class": 3, "seed": 2, "steps": 500})))
        t.start()
        time.sleep(0.5)
        out = s.stop()
        t.join()
        assert late and late[0][0] == 200, late
        assert s.proc.returncode == 0 and "stopped:" in out
    finally:
        s.stop()


def test_server_timeout_and_request_limit(cpp: Path, bundles: Path) -> None:
    s = Server(cpp, bundles / "demo_theorem", "--timeout-ms", "1", "--max-requests", "2")
    try:
        status, body = s.generate({"class": 1, "seed": 1, "steps": 1000})
        assert status == 504 and b"longer than 1 ms" in body
        s.generate({"class": 1, "seed": 1, "steps": 2})
        assert s.proc.wait(timeout=60) == 0  # stopped by itself after 2 answered requests
    finally:
        s.stop()

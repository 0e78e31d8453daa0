"""The C++ runtime refuses what it must, as the Python runtime does: bad bundles and arguments (the manifest
contract, the odds preset's banks, every listed file hashed, a crafted graph with a matching hash, an unavailable
provider) and hostile input (bounded batch files, non-finite results, bad numbers, invalid UTF-8, bad output
paths): a non-zero exit code with a message naming the problem, never a crash, a hang, a black image or a stray
file. Split from test_cpp_runtime.py, whose fixtures and helpers these tests share."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from test_cpp_runtime import EXIT, bundles, copy_bundle, cpp, edit_manifest, expect_failure, run

from safe_denoiser.runtime.bundle import Bundle
from safe_denoiser.runtime.manifest import FORMAT_VERSION, Manifest

__all__ = ["bundles", "cpp"]  # fixtures shared with test_cpp_runtime


def test_bad_bundles_and_arguments(cpp: Path, bundles: Path, tmp_path: Path) -> None:
    out = tmp_path / "x.png"

    def gen(bundle: Path, *extra: str) -> list[str]:
        return ["generate", "--bundle", str(bundle), "--seed", "1", "--out", str(out), *(extra or ("--class", "3"))]

    expect_failure(cpp, out, "bundle", "not a folder", *gen(tmp_path / "nope"))
    b = copy_bundle(bundles, tmp_path / "missing")
    (b / "denoiser.onnx").unlink()
    expect_failure(cpp, out, "bundle", "'denoiser.onnx' of graph 'denoiser' is missing", *gen(b))
    b = copy_bundle(bundles, tmp_path / "version")
    edit_manifest(b, format_version=FORMAT_VERSION + 1)
    expect_failure(cpp, out, "bundle", f"format_version {FORMAT_VERSION + 1} is not supported", *gen(b))
    b = copy_bundle(bundles, tmp_path / "flow")
    edit_manifest(b, path="flow")  # without a flow section (the contract, tests/test_manifest_contract.py)
    expect_failure(cpp, out, "bundle", "flow must be an object (the flow sampler's settings), got null", *gen(b))
    b = copy_bundle(bundles, tmp_path / "safree")
    section = {"alpha": 0.01, "self_validation": True, "svf_max_step": 2.5}  # the first wrong field is named
    edit_manifest(b, safree=section)
    expect_failure(cpp, out, "bundle", "safree.svf_max_step must be an integer in 0..2147483647, got 2.5", *gen(b))
    b = copy_bundle(bundles, tmp_path / "hash")
    edit_manifest(b, **{"bank.sha256": "0" * 64})
    expect_failure(cpp, out, "bundle", "bank hash mismatch", *gen(b))
    b = copy_bundle(bundles, tmp_path / "corrupt")
    (b / "denoiser.onnx").write_bytes((b / "denoiser.onnx").read_bytes()[:5000])
    expect_failure(cpp, out, "bundle", "denoiser.onnx", *gen(b))
    b = copy_bundle(bundles, tmp_path / "json")
    (b / "manifest.json").write_text('{"format": "safe-denoiser.bundle", ')
    expect_failure(cpp, out, "bundle", "not readable JSON", *gen(b))
    b = copy_bundle(bundles, tmp_path / "tok", "tiny_sld")
    (b / "tokenizer" / "tokenizer.json").write_text("{ nope")
    # (past the file hashes, which refuse the edited file first: the tokenizer's own parse error)
    expect_failure(cpp, out, "bundle", "tokenizer.json is not JSON", *gen(b, "--prompt", "a cat", "--no-verify-files"))

    demo = bundles / "demo_theorem"
    expect_failure(cpp, out, "input", "class must lie in 0..12 (10 = no class), got 13", *gen(demo, "--class", "13"))
    expect_failure(cpp, out, "input", "prompt", *gen(demo, "--prompt", "a cat"))
    expect_failure(cpp, out, "input", "class: required", *gen(bundles / "demo_theorem", "--steps", "3"))
    expect_failure(cpp, out, "input", "steps must lie in 1..1000", *gen(demo, "--class", "1", "--steps", "5000"))
    np.save(tmp_path / "bad_shape.npy", np.zeros((1, 1, 8, 7), np.float32))
    expect_failure(
        cpp,
        out,
        "input",
        "expected (1, 1, 8, 8)",
        *gen(demo, "--class", "1", "--noise", str(tmp_path / "bad_shape.npy")),
    )
    np.save(tmp_path / "f64.npy", np.zeros((1, 1, 8, 8), np.float64))
    expect_failure(cpp, out, "input", "float32", *gen(demo, "--class", "1", "--noise", str(tmp_path / "f64.npy")))
    expect_failure(
        cpp, out, "provider", "unknown execution provider 'rocm'", *gen(demo, "--class", "1", "--provider", "rocm")
    )
    expect_failure(cpp, out, "provider", "is not available", *gen(demo, "--class", "1", "--provider", "cuda"))
    expect_failure(
        cpp, out, "provider", "TensorrtExecutionProvider", *gen(demo, "--class", "1", "--provider", "tensorrt")
    )
    expect_failure(cpp, out, "usage", "excludes", *gen(demo, "--class", "1", "--prompt", "x"))
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if not os.access(locked, os.W_OK):  # root may write anywhere: then use a path under a file instead
            target = locked / "x.png"
        else:
            (tmp_path / "afile").write_text("")
            target = tmp_path / "afile" / "x.png"
        expect_failure(
            cpp,
            target,
            "io",
            "is not a writable folder",
            "generate",
            "--bundle",
            str(demo),
            "--class",
            "1",
            "--seed",
            "1",
            "--out",
            str(target),
        )
    finally:
        locked.chmod(0o700)


def test_odds_bundle_checks(cpp: Path, bundles: Path, tmp_path: Path) -> None:
    """The reference bank of an odds bundle is checked as the negative bank is (hash, presence, storage dtype)."""
    out = tmp_path / "x.png"
    gen = ["generate", "--seed", "1", "--class", "3", "--out", str(out)]
    b = copy_bundle(bundles, tmp_path / "hash", "demo_odds")
    edit_manifest(b, **{"reference_bank.sha256": "0" * 64})
    expect_failure(cpp, out, "bundle", "reference bank hash mismatch", *gen, "--bundle", str(b))
    b = copy_bundle(bundles, tmp_path / "missing", "demo_odds")
    edit_manifest(b, reference_bank=None)
    expect_failure(cpp, out, "bundle", "reference_bank must be set exactly when", *gen, "--bundle", str(b))
    b = copy_bundle(bundles, tmp_path / "dtype", "demo_odds_fp16")
    edit_manifest(b, **{"bank.dtype": "float32"})
    expect_failure(cpp, out, "bundle", "is float16, the manifest says float32", *gen, "--bundle", str(b))


def flip_byte(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def test_every_listed_file_is_hashed(cpp: Path, bundles: Path, tmp_path: Path) -> None:
    """manifest ``files``: a flipped byte or a missing file is refused naming it, as Python's Manifest.load does;
    ``--no-verify-files`` skips the hashing."""
    out = tmp_path / "x.png"
    for name in ("demo_theorem", "tiny_sld"):
        info = json.loads(run(cpp, "info", "--bundle", str(bundles / name)).stdout)
        listed = json.loads((bundles / name / "manifest.json").read_text())["files"]
        assert info["files_verified"] and info["files"] == len(listed) >= 1, info
    cases = [
        ("demo_theorem", "denoiser.onnx", "flip", ("--class", "3")),
        ("tiny_sld", "tokenizer/tokenizer.json", "flip", ("--prompt", "a cat")),
        ("tiny_sld", "tokenizer/tokenizer_config.json", "flip", ("--prompt", "a cat")),
        ("tiny_sld", "text_encoder.onnx", "flip", ("--prompt", "a cat")),
        ("tiny_sld", "tokenizer/tokenizer_config.json", "remove", ("--prompt", "a cat")),
    ]
    for i, (name, file, how, cond) in enumerate(cases):
        b = copy_bundle(bundles, tmp_path / f"case{i}", name)
        if how == "flip":
            flip_byte(b / file, (b / file).stat().st_size // 2)
            needle = f"file '{file}' does not match the manifest"
        else:
            (b / file).unlink()
            needle = f"file '{file}' listed in the manifest is missing"
        args = ("generate", "--bundle", str(b), "--seed", "1", "--steps", "2", "--out", str(out), *cond)
        expect_failure(cpp, out, "bundle", needle, *args)
        with pytest.raises(ValueError, match=f"'{file}'"):  # the Python runtime refuses the same file
            Manifest.load(b)
    # The opt-out: a recorded hash that no longer matches is refused, skipped with --no-verify-files (same image).
    b = copy_bundle(bundles, tmp_path / "optout")
    data = json.loads((b / "manifest.json").read_text())
    data["files"]["denoiser.onnx"] = "a" * 64
    (b / "manifest.json").write_text(json.dumps(data))
    opts = ("generate", "--seed", "5", "--steps", "3", "--class", "2")
    expect_failure(
        cpp, out, "bundle", "file 'denoiser.onnx' does not match", *opts, "--bundle", str(b), "--out", str(out)
    )
    run(cpp, *opts, "--bundle", str(b), "--out", str(out), "--no-verify-files")
    run(cpp, *opts, "--bundle", str(bundles / "demo_theorem"), "--out", str(tmp_path / "intact.png"))
    assert out.read_bytes() == (tmp_path / "intact.png").read_bytes()
    info = json.loads(run(cpp, "info", "--bundle", str(b), "--no-verify-files").stdout)
    assert info["files_verified"] is False


def initializer_offset(graph: Path, name: str) -> int:
    """Where an initializer's bytes start in its graph's external-data file."""
    import onnx

    proto = onnx.load(str(graph), load_external_data=False)
    tensor = next(t for t in proto.graph.initializer if t.name == name)
    return int(next(e.value for e in tensor.external_data if e.key == "offset"))


def test_external_weights_are_hashed_while_the_sessions_open(cpp: Path, bundles: Path, tmp_path: Path) -> None:
    """Weights in external-data files are hashed on a worker while the sessions open (BackgroundVerification): the
    image is the inline bundle's, and a damaged weights file is named as such, never as what loading it gave (a
    truncated file's onnxruntime error, the bank hash of a byte flipped inside the bank)."""
    name = "tiny_external"
    listed = json.loads((bundles / name / "manifest.json").read_text())["files"]
    data_files = sorted(f for f in listed if f.endswith(".onnx.data"))
    assert {"denoiser.onnx.data", "text_encoder.onnx.data", "vae_decoder.onnx.data"} <= set(data_files), listed
    info = json.loads(run(cpp, "info", "--bundle", str(bundles / name)).stdout)
    assert info["files_verified"] and info["files_hashed"] + info["files_from_cache"] == len(listed), info
    gen = ("generate", "--prompt", "a cat", "--seed", "3", "--steps", "3")
    run(cpp, *gen, "--bundle", str(bundles / name), "--out", str(tmp_path / "external.png"))
    run(cpp, *gen, "--bundle", str(bundles / "tiny_theorem"), "--out", str(tmp_path / "inline.png"))
    assert (tmp_path / "external.png").read_bytes() == (tmp_path / "inline.png").read_bytes()

    bank = json.loads((bundles / name / "manifest.json").read_text())["bank"]["initializer"]
    out = tmp_path / "x.png"
    cases = {
        "flip": lambda p: flip_byte(p, p.stat().st_size // 2),
        "truncate": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
        "bank": lambda p: flip_byte(p, initializer_offset(p.parent / "denoiser.onnx", bank) + 5),
    }
    for file in data_files:
        for how, damage in cases.items():
            if how == "bank" and file != "denoiser.onnx.data":
                continue
            b = copy_bundle(bundles, tmp_path / f"{how}-{file}", name)
            damage(b / file)
            needle = f"file '{file}' does not match the manifest"
            expect_failure(cpp, out, "bundle", needle, *gen, "--bundle", str(b), "--out", str(out))
            with pytest.raises(ValueError, match=f"'{file}'"):  # the Python runtime refuses the same file
                Manifest.load(b)
    # Unchecked, the flipped bank byte is what the bank check reports.
    b = tmp_path / "bank-denoiser.onnx.data" / name
    expect_failure(
        cpp, out, "bundle", "bank hash mismatch", *gen, "--bundle", str(b), "--out", str(out), "--no-verify-files"
    )


def test_cuda_append_path_fails_cleanly(cpp: Path, bundles: Path, tmp_path: Path) -> None:
    """With the availability check skipped, the provider set-up itself reports the missing provider (no abort)."""
    out = tmp_path / "x.png"
    env = {**os.environ, "SAFE_DENOISER_CPP_SKIP_PROVIDER_CHECK": "1"}
    for provider in ("cuda", "tensorrt"):
        proc = subprocess.run(
            [
                str(cpp),
                "generate",
                "--bundle",
                str(copy_bundle(bundles, tmp_path / provider)),
                "--class",
                "1",
                "--seed",
                "1",
                "--out",
                str(out),
                "--provider",
                provider,
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert proc.returncode == EXIT["provider"], proc.stderr
        assert "could not be set up" in proc.stderr and not out.exists()


def test_bad_batch_requests_write_nothing(cpp: Path, bundles: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    bad = {
        "not json": ('{"class": 1}\n{"class": 2,\n', "line 2: request: not JSON"),
        "unknown field": ('{"class": 1, "colour": "red"}\n', "unknown field 'colour'"),
        "bad type": ('{"class": "one"}\n', "class: expected an integer"),
        "bad id": ('{"class": 1, "id": "../x"}\n', "id: expected a file stem"),
        "dup id": ('{"class": 1, "id": "a"}\n{"class": 2, "id": "a"}\n', "appears twice"),
        "negative seed": ('{"class": 1, "seed": -3}\n', "seed: expected"),
    }
    for name, (text, needle) in bad.items():
        (tmp_path / "r.jsonl").write_text(text)
        proc = run(
            cpp,
            "batch",
            "--bundle",
            str(bundles / "demo_theorem"),
            "--requests",
            str(tmp_path / "r.jsonl"),
            "--out-dir",
            str(out),
            check=False,
        )
        assert proc.returncode == EXIT["input"], (name, proc.stderr)
        assert needle in proc.stderr, (name, proc.stderr)
        assert not list(out.iterdir()), name


# ---- issue 26: hostile input ends in an error, never a crash, a hang, a black image or a stray file -----------------
def expect_nothing_written(folder: Path, proc: subprocess.CompletedProcess[str], code: str, needle: str) -> None:
    assert proc.returncode == EXIT[code], (proc.returncode, proc.stderr)
    assert needle in proc.stderr, (needle, proc.stderr)
    assert "terminate called" not in proc.stderr and "AddressSanitizer" not in proc.stderr
    assert not list(folder.iterdir()), sorted(p.name for p in folder.iterdir())


def batch(cpp: Path, bundle: Path, requests: Path | str, out: Path) -> subprocess.CompletedProcess[str]:
    args = ["batch", "--bundle", str(bundle), "--requests", str(requests), "--out-dir", str(out)]
    return run(cpp, *args, check=False)


def test_batch_input_is_bounded(cpp: Path, bundles: Path, tmp_path: Path) -> None:
    """100,000-deep nesting (a SIGSEGV) and /dev/zero (2.1 GB, exit 0) end in errors naming the line."""
    out = tmp_path / "out"
    out.mkdir()
    deep = tmp_path / "deep.jsonl"
    deep.write_text('{"class": 1}\n' + "[" * 100_000 + "]" * 100_000 + "\n")
    proc = batch(cpp, bundles / "demo_theorem", deep, out)
    expect_nothing_written(out, proc, "input", "line 2: request: JSON nested deeper than 64 levels")
    long_line = tmp_path / "long.jsonl"
    long_line.write_text('{"class": 1, "prompt": "' + "x" * (1 << 20) + '"}\n')
    proc = batch(cpp, bundles / "demo_theorem", long_line, out)
    expect_nothing_written(out, proc, "input", "line 1: longer than 1048576 bytes")
    start = time.monotonic()
    proc = batch(cpp, bundles / "demo_theorem", "/dev/zero", out)
    expect_nothing_written(out, proc, "input", "/dev/zero line 1: longer than 1048576 bytes")
    assert time.monotonic() - start < 60
    proc = batch(cpp, bundles / "demo_theorem", tmp_path, out)
    expect_nothing_written(out, proc, "io", "--requests: cannot read")
    # JSON fields: numbers out of range and text that is not UTF-8 are refused, naming the field.
    for line, needle in [
        ('{"class": 1, "seed": -1}', "seed: expected an integer in 0..2^64-1"),
        ('{"class": 1, "steps": 0}', "steps: expected an integer in 1..1000"),
        ('{"class": 1, "steps": -5}', "steps: expected an integer in 1..1000"),
        ('{"class": 1, "guidance": 1e30}', "guidance: expected a number in -1000..1000"),
    ]:
        (tmp_path / "r.jsonl").write_text(line + "\n")
        expect_nothing_written(out, batch(cpp, bundles / "demo_theorem", tmp_path / "r.jsonl", out), "input", needle)
    (tmp_path / "r.jsonl").write_bytes(b'{"prompt": "a \xff cat"}\n')
    proc = batch(cpp, bundles / "tiny_sld", tmp_path / "r.jsonl", out)  # the message escapes the byte it quotes
    expect_nothing_written(out, proc, "input", "line 1: request: not JSON")
    assert "ill-formed UTF-8 byte" in proc.stderr and "\\xff" in proc.stderr, proc.stderr


def crafted_onnx_bundle(bundles: Path, tmp_path: Path) -> Path:
    """demo_theorem with a 25-byte denoiser.onnx whose initializer length (2^64 - 11) wraps back onto its own tag."""
    graph = b"\x2a" + bytes.fromhex("f5ffffffffffffffff01") + b"\x42\x08negative"
    crafted = b"\x08\x08\x3a" + bytes([len(graph)]) + graph
    b = copy_bundle(bundles, tmp_path)
    (b / "denoiser.onnx").write_bytes(crafted)
    data = json.loads((b / "manifest.json").read_text())
    data["files"]["denoiser.onnx"] = hashlib.sha256(crafted).hexdigest()
    (b / "manifest.json").write_text(json.dumps(data))
    return b


def test_crafted_onnx_with_matching_hash_is_refused(cpp: Path, bundles: Path, tmp_path: Path) -> None:
    """info, generate and serve spun forever on it, even with --no-verify-files; Python refuses it."""
    b = crafted_onnx_bundle(bundles, tmp_path)
    with pytest.raises(Exception):  # noqa: B017 - the Python runtime's refusal, whatever its type
        Bundle(b, threads=1)
    out = tmp_path / "x.png"
    for args in (["info"], ["generate", "--class", "1", "--seed", "1", "--out", str(out)], ["serve", "--port", "0"]):
        for verify in ([], ["--no-verify-files"]):
            proc = subprocess.run(
                [str(cpp), *args, "--bundle", str(b), *verify], capture_output=True, text=True, timeout=60
            )
            assert proc.returncode == EXIT["bundle"], (args, verify, proc.stderr)
            assert "is not a readable ONNX file" in proc.stderr, proc.stderr
            assert not out.exists()


def test_non_finite_results_are_errors_not_images(cpp: Path, bundles: Path, tmp_path: Path) -> None:
    """Guidance 1e30, NaN or overflowing noise, a schedule with alphas above 1: an error, never a black PNG."""
    out = tmp_path / "out"
    out.mkdir()
    demo = bundles / "demo_theorem"

    def gen(bundle: Path, *extra: str) -> subprocess.CompletedProcess[str]:
        return run(cpp, "generate", "--bundle", str(bundle), "--class", "1", "--seed", "1", "--out",
                   str(out / "x.png"), *extra, check=False)  # fmt: skip

    expect_nothing_written(out, gen(demo, "--guidance", "1e30"), "usage", "--guidance: expected a finite number")
    expect_nothing_written(out, gen(demo, "--guidance", "nan"), "usage", "--guidance: expected a finite number")
    noise = tmp_path / "noise.npy"
    np.save(noise, np.full((1, 1, 8, 8), np.nan, np.float32))
    expect_nothing_written(out, gen(demo, "--noise", str(noise)), "input", "noise: holds NaN or Inf")
    np.save(noise, np.full((1, 1, 8, 8), 3e38, np.float32))
    proc = gen(demo, "--noise", str(noise))
    expect_nothing_written(out, proc, "runtime", "step 1 of 10 (timestep 999) made non-finite samples for image(s) [0]")
    b = copy_bundle(bundles, tmp_path)
    data = json.loads((b / "manifest.json").read_text())
    data["scheduler"]["alphas_cumprod"][3] = 1.5
    (b / "manifest.json").write_text(json.dumps(data))
    proc = gen(b, "--no-verify-files")
    expect_nothing_written(out, proc, "bundle", "scheduler.alphas_cumprod[3] must be in (0, 1], got 1.5")


@pytest.mark.parametrize(
    "args",
    [
        ["generate", "--seed", "-1"],
        ["generate", "--seed", "010"],
        ["generate", "--seed", "18446744073709551616"],
        ["generate", "--steps", "0"],
        ["generate", "--steps", "-5"],
        ["generate", "--steps", "-0"],
        ["generate", "--threads", "-1"],
        ["generate", "--item", "-1"],
        ["serve", "--timeout-ms", "-1"],
        ["serve", "--max-body", "0"],
        ["serve", "--port", "65536"],
        ["serve", "--max-seconds", "nan"],
        ["serve", "--http-threads", "010"],
        ["serve", "--max-connections", "-1"],
        ["serve", "--read-timeout-ms", "1e4"],
        ["batch", "--max-batch", "0"],
    ],
    ids=" ".join,
)
def test_bad_numbers_are_refused_naming_the_flag(cpp: Path, bundles: Path, tmp_path: Path, args: list[str]) -> None:
    """They were reinterpreted: --seed -1 ran as 2^64-1, --steps 0 as the manifest's 50, --max-body 0 gave 413s."""
    command, flag, value = args
    extra = {
        "generate": ["--class", "1", "--out", str(tmp_path / "x.png"), *(["--seed", "1"] if flag != "--seed" else [])],
        "serve": ["--max-seconds", "1"] if flag != "--max-seconds" else [],
        "batch": ["--requests", str(tmp_path / "r.jsonl"), "--out-dir", str(tmp_path)],
    }[command]
    proc = run(cpp, command, "--bundle", str(bundles / "demo_theorem"), flag, value, *extra, check=False)
    assert proc.returncode == EXIT["usage"], proc.stderr
    assert f"{flag}: expected a " in proc.stderr and f"got '{value}'" in proc.stderr, proc.stderr
    assert not list(tmp_path.iterdir())


def test_invalid_utf8_prompts_and_bad_out_paths_write_nothing(cpp: Path, bundles: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    tiny = str(bundles / "tiny_sld")
    for flag in ("--prompt", "--negative-prompt"):
        prompt = [flag, b"a \xff cat"] + (["--prompt", "a cat"] if flag != "--prompt" else [])
        cmd = [str(cpp), "generate", "--bundle", tiny, "--seed", "1", "--out", str(out / "x.png"), *prompt]
        proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=300)
        expect_nothing_written(out, proc, "input", f"{flag[2:].replace('-', '_')}: not valid UTF-8 text")
    demo = ["generate", "--bundle", str(bundles / "demo_theorem"), "--class", "1", "--seed", "1"]
    (out / "folder").mkdir()
    proc = subprocess.run(
        [str(cpp), *demo, "--out", str(out / "folder")], capture_output=True, text=True, timeout=300, cwd=out
    )
    assert proc.returncode == EXIT["io"] and "is a folder, expected a file path" in proc.stderr, proc.stderr
    (out / "folder").rmdir()
    expect_nothing_written(out, run(cpp, *demo, "--out", str(out / "folder"), "--record", str(out), check=False),
                           "io", "--record: '" + str(out) + "' is a folder")  # fmt: skip
    proc = subprocess.run([str(cpp), *demo, "--out", ""], capture_output=True, text=True, timeout=300, cwd=out)
    expect_nothing_written(out, proc, "io", "--out: expected a file path, got ''")
    proc = run(cpp, *demo, "--out", str(out / "x.json"), check=False)
    expect_nothing_written(out, proc, "usage", "--record: '" + str(out / "x.json") + "' is also --out")
    # The check comes first, the generation after: a failing generation writes neither file either.
    proc = run(cpp, *demo, "--out", str(out / "x.png"), "--steps", "5000", check=False)
    expect_nothing_written(out, proc, "input", "steps must lie in 1..1000")

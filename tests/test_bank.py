"""NegativeBank: round trip, validation errors, building from images with a (tiny, random) diffusers VAE."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from safe_denoiser import BankError, NegativeBank, l2_normalize_positions
from safe_denoiser.cli import main

from helpers import LAMBDA, U32, assert_within, tiny_vae_dir


def test_round_trip(tmp_path: Path) -> None:
    data = torch.randn(7, 4, 8, 8)
    bank = NegativeBank.from_tensor(data, concept="nudity")
    path = bank.save(tmp_path / "b.safetensors")
    back = NegativeBank.load(path, sample_shape=(4, 8, 8))
    assert torch.equal(back.data, data)
    assert back.metadata["concept"] == "nudity" and back.metadata["count"] == "7"
    assert json.loads(back.metadata["sample_shape"]) == [4, 8, 8]
    assert back.sha256() == bank.sha256()
    assert NegativeBank.load(path, dtype=torch.float16).data.dtype == torch.float16
    assert not list(tmp_path.glob("*.tmp"))  # the atomic write left nothing behind


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (torch.zeros(0, 4), "empty"),
        (torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), "non-finite"),
        (torch.tensor([[1.0, float("inf")]]), "non-finite"),
        (torch.zeros(3, 4, dtype=torch.int64), "floating"),
        (torch.zeros(5), "at least 2 dimensions"),
    ],
)
def test_bad_tensor(data: torch.Tensor, message: str) -> None:
    with pytest.raises(BankError, match=message):
        NegativeBank(data)


def test_wrong_sample_shape(tmp_path: Path) -> None:
    path = NegativeBank.from_tensor(torch.randn(3, 4, 8, 8)).save(tmp_path / "b.safetensors")
    with pytest.raises(BankError, match=r"does not match the model's sample shape \(4, 16, 16\)"):
        NegativeBank.load(path, sample_shape=(4, 16, 16))


def test_corrupt_and_foreign_files(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01 not a safetensors file")
    with pytest.raises(BankError, match="not a readable safetensors file"):
        NegativeBank.load(garbage)
    with pytest.raises(BankError, match="does not exist"):
        NegativeBank.load(tmp_path / "missing.safetensors")
    foreign = tmp_path / "foreign.safetensors"
    save_file({"weights": torch.zeros(2, 2)}, str(foreign))
    with pytest.raises(BankError, match="no tensor named 'bank'"):
        NegativeBank.load(foreign)
    no_header = tmp_path / "noheader.safetensors"
    save_file({"bank": torch.zeros(2, 2)}, str(no_header))
    with pytest.raises(BankError, match="format"):
        NegativeBank.load(no_header)
    # truncated copy of a good file
    good = NegativeBank.from_tensor(torch.randn(4, 16)).save(tmp_path / "good.safetensors")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-20])
    with pytest.raises(BankError, match="not a readable safetensors file"):
        NegativeBank.load(cut)


def test_header_must_match_tensor(tmp_path: Path) -> None:
    path = tmp_path / "lying.safetensors"
    meta = {"format": "safe-denoiser.negative-bank/1", "count": "9", "sample_shape": "[4]"}
    save_file({"bank": torch.zeros(3, 4)}, str(path), metadata=meta)
    with pytest.raises(BankError, match="header says count=9"):
        NegativeBank.load(path)


def test_l2_normalize_positions() -> None:
    z = torch.randn(2, 4, 3, 3)
    n = l2_normalize_positions(z)
    assert torch.allclose(n.norm(dim=1), torch.ones(2, 3, 3))
    # float32: each norm sums 4 squares and takes a root (relative error <= 5 u), then a division and a product
    assert_within(n * z.norm(dim=1, keepdim=True), z, 16 * U32 * z.abs(), "n ||z||")


def write_images(folder: Path, n: int) -> None:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(folder / f"img{i}.png")


def test_cli_build_matches_direct_encoding(tmp_path: Path) -> None:
    from safe_denoiser.core.bank import load_image_folder
    from safe_denoiser.diffusers.vae import load_vae

    write_images(tmp_path / "imgs", 5)
    model = tiny_vae_dir(tmp_path / "model")
    out = tmp_path / "bank.safetensors"
    args = ["bank", "build", "--images", str(tmp_path / "imgs"), "--vae", str(model), "--out", str(out)]
    assert main([*args, "--size", "16", "--batch-size", "2", "--l2-normalize"]) == 0
    bank = NegativeBank.load(out)
    assert len(bank) == 5 and bank.sample_shape == (4, 8, 8)
    assert bank.metadata["normalization"] == "l2-per-position"
    # independent path: encode all images in one batch with the VAE directly
    _, images = load_image_folder(tmp_path / "imgs", 16)
    vae = load_vae(model)
    with torch.no_grad():
        z = vae.encode(torch.stack(list(images()))).latent_dist.mean * vae.config.scaling_factor
    assert torch.allclose(bank.data, l2_normalize_positions(z), atol=1e-5)
    # refuses to clobber an existing bank
    before = out.read_bytes()
    assert main([*args, "--size", "16"]) == 2
    assert out.read_bytes() == before
    assert main([*args, "--size", "16", "--overwrite", "--latent", "sample"]) == 0
    assert NegativeBank.load(out).metadata["latent"] == "sample"


def test_cli_build_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_images(tmp_path / "imgs", 2)
    (tmp_path / "empty").mkdir()
    model = tiny_vae_dir(tmp_path / "model")
    base = ["bank", "build", "--out", str(tmp_path / "b.safetensors")]
    cases = [
        (["--images", str(tmp_path / "nope"), "--vae", str(model)], "--images"),
        (["--images", str(tmp_path / "empty"), "--vae", str(model)], "holds no images"),
        (["--images", str(tmp_path / "imgs"), "--vae", str(tmp_path / "nope")], "--vae"),
        (["--images", str(tmp_path / "imgs"), "--vae", str(tmp_path / "empty")], "config.json"),
        (["--images", str(tmp_path / "imgs"), "--vae", str(model), "--size", "10"], "--size"),
    ]
    for extra, message in cases:
        assert main(base + extra) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "b.safetensors").exists()


def test_cli_info(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = NegativeBank.from_tensor(torch.randn(3, 2, 2), concept="x").save(tmp_path / "b.safetensors")
    assert main(["bank", "info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "3 items of shape (2, 2)" in out and "concept: x" in out


def test_sq_norms_are_computed_once_and_follow_the_data() -> None:
    bank = NegativeBank.from_tensor(torch.randn(9, 4, 8, 8))
    exact = bank.data.double().flatten(1).square().sum(1)
    # a 256-term sum of squares, a square root, squared again (float32)
    assert_within(bank.sq_norms, exact, LAMBDA * 16.5 * U32 * exact, "norms")
    assert bank.sq_norms is bank.sq_norms  # cached
    bank.data.mul_(2.0)  # an in-place change bumps the tensor's version: the norms are recomputed
    assert_within(bank.sq_norms, 4 * exact, 4 * LAMBDA * 16.5 * U32 * exact, "norms after mul_")
    moved = bank.to(device="cpu")
    assert torch.equal(moved.sq_norms, bank.sq_norms)
    half = bank.to(dtype=torch.float16)  # rounded values: their own norms
    assert torch.equal(half.sq_norms, NegativeBank(half.data.clone()).sq_norms)
    assert not torch.equal(half.sq_norms, bank.sq_norms)
    with pytest.raises(BankError, match="overflow float32"):
        NegativeBank(torch.full((2, 4), 1e20))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_half_storage_and_mmap_round_trip(tmp_path: Path, dtype: torch.dtype) -> None:
    data = torch.randn(40, 4, 8, 8).to(dtype)
    path = NegativeBank.from_tensor(data).save(tmp_path / "b.safetensors")
    assert path.stat().st_size < data.numel() * data.element_size() + 4096  # stored at its own width
    plain = NegativeBank.load(path)
    mapped = NegativeBank.load(path, sample_shape=(4, 8, 8), mmap=True)
    assert plain.data.dtype == mapped.data.dtype == dtype
    assert torch.equal(plain.data, data) and torch.equal(mapped.data, data)
    assert torch.equal(mapped.sq_norms, plain.sq_norms) and mapped.sha256() == plain.sha256()
    with pytest.raises(BankError, match="mmap=True"):
        NegativeBank.load(path, mmap=True, dtype=torch.float32)
    bad = tmp_path / "nan.safetensors"
    meta = {**plain.metadata, "count": "1", "sample_shape": "[2]"}
    save_file({"bank": torch.tensor([[1.0, float("nan")]])}, str(bad), metadata=meta)
    with pytest.raises(BankError, match="non-finite"):
        NegativeBank.load(bad, mmap=True)


def test_mmap_bank_runs_the_kernel_at_bounded_memory(tmp_path: Path) -> None:
    """A 256 MiB bank file: mapped, validated and used by the kernel with a few MiB of anonymous memory."""
    import subprocess
    import sys

    n, d = 64_000, 1024
    path = tmp_path / "big.safetensors"
    code = f"""
import torch
from safe_denoiser import NegativeBank
NegativeBank.from_tensor(torch.randn({n}, {d})).save({str(path)!r})
"""
    subprocess.run([sys.executable, "-c", code], check=True)
    code = f"""
import torch
from safe_denoiser import NegativeBank
from safe_denoiser.core.kernel import path_kernel_estimate
from safe_denoiser.core.paths import vp_path

def anon_kib():
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("RssAnon:"))

x = torch.randn(2, {d})
path_kernel_estimate(x, torch.randn(64, {d}), vp_path(0.5))  # warm the allocator and code paths
before = anon_kib()
bank = NegativeBank.load({str(path)!r}, mmap=True)
est = path_kernel_estimate(x, bank.data, vp_path(0.5), bank_sq_norms=bank.sq_norms)
assert bool(torch.isfinite(est.mean).all())
print(anon_kib() - before)
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    growth_mib = int(res.stdout.strip().splitlines()[-1]) / 1024
    file_mib = n * d * 4 / 2**20
    assert growth_mib < 24, f"anonymous memory grew by {growth_mib:.1f} MiB for a {file_mib:.0f} MiB bank"


def test_nearest_neighbour_distance_and_odds_sigma_hint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The median nearest-neighbour distance against explicit float64 differences; the demo bank's suggested
    odds_sigma is the tuned one (1.0) it was calibrated on; ``bank info`` prints the hint."""
    from safe_denoiser.core.beta import nearest_neighbour_distance, suggest_odds_sigma
    from safe_denoiser.demo.bank import load_bundled_bank

    g = torch.Generator().manual_seed(0)
    y = torch.randn(30, 3, 4, 4, generator=g)
    d = (y.double().flatten(1)[:, None] - y.double().flatten(1)[None]).square().sum(-1).sqrt()
    d.fill_diagonal_(math.inf)
    assert nearest_neighbour_distance(y) == pytest.approx(float(d.min(1).values.median()), rel=1e-9)
    assert suggest_odds_sigma(load_bundled_bank().data) == pytest.approx(1.0, abs=0.01)
    with pytest.raises(ValueError, match="at least 2"):
        nearest_neighbour_distance(y[:1])
    path = NegativeBank.from_tensor(y).save(tmp_path / "b.safetensors")
    assert main(["bank", "info", str(path)]) == 0
    assert "a starting odds_sigma" in capsys.readouterr().out

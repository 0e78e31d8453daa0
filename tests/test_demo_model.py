"""The bundled digits model: data split, judge, pipeline sampling, and a tiny training run (fast, CPU)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from safe_denoiser.demo.digits import SPLIT_SIZES, load_split, split_indices
from safe_denoiser.demo.judge import DigitsJudge, accuracy
from safe_denoiser.demo.model import NULL_CLASS, DigitsDiffusion, train
from safe_denoiser.demo.pipeline import DigitsPipeline, bundled_path

# A tiny UNet: enough to exercise training and saving in a second or two.
TINY = {"block_out_channels": (8, 16), "norm_num_groups": 4, "attention": False}

# Batched and single-item UNet calls round differently (other kernel blockings), and the sampling loop magnifies
# rounding: x0 = (x - sqrt(1 - abar) eps) / sqrt(abar) with abar ~ 1e-8 at the first steps, and x0 clipping. Measured
# over 200 seed sets of the test below (u = unit roundoff): float32 runs differ from float64 by up to 1.0e5 u32 max|x|,
# so float32 batch and items differed by more than 1e-4 for 20 (DDIM) and 13 (DDPM) of 200; in float64, batch and
# items differ by up to 1.25e5 u64 max|x| (DDIM; DDPM 2.8e4). LOOP_AMPLIFICATION bounds that with a margin of 8, about
# 1e-10 relative in float64: any leak between the images of a batch (noise, labels, guidance) would be far above it.
LOOP_AMPLIFICATION = 1e6
U64 = 2.0**-53


@pytest.fixture(scope="module")
def pipe() -> DigitsPipeline:
    return DigitsPipeline.from_bundled(scheduler="ddim")


@pytest.fixture(scope="module")
def judge() -> DigitsJudge:
    return DigitsJudge.from_bundled()


# ---- data -----------------------------------------------------------------------------------------
def test_split_disjoint_deterministic_and_complete() -> None:
    parts = {s: split_indices(s) for s in ("generator", "judge", "eval")}
    assert {s: len(v) for s, v in parts.items()} == SPLIT_SIZES
    union = np.concatenate(list(parts.values()))
    assert len(np.unique(union)) == len(union) == 1797  # disjoint and covering load_digits
    for s, idx in parts.items():
        np.testing.assert_array_equal(split_indices(s), idx)  # same call, same indices
        data = load_split(s)
        assert data.images.shape == (len(idx), 1, 8, 8) and data.images.dtype == torch.float32
        assert float(data.images.min()) == -1.0 and float(data.images.max()) == 1.0
        counts = np.bincount(data.labels.numpy(), minlength=10)
        assert counts.min() >= 0.9 * counts.max()  # stratified: every class about equally present
    # Pinned: a change in the split (or in scikit-learn's shuffling) must be noticed, not silently shift results.
    assert parts["eval"][:5].tolist() == json.loads((bundled_path() / "judge.json").read_text())["eval_first_indices"]


def test_bad_split_name() -> None:
    with pytest.raises(ValueError, match="unknown digits split"):
        split_indices("test")  # type: ignore[arg-type]


# ---- judge ----------------------------------------------------------------------------------------
def test_judge_heldout_accuracy_matches_record(judge: DigitsJudge) -> None:
    record = DigitsJudge.bundled_record()
    held = load_split("eval")
    acc = accuracy(judge, held.images, held.labels)
    assert abs(acc - record["heldout_accuracy"]) <= 0.005
    assert acc >= 0.95
    assert judge.features(held.images[:4]).shape == (4, record["config"]["feature_dim"])
    p = judge.probs(held.images[:4])
    torch.testing.assert_close(p.sum(-1), torch.ones(4))


# ---- pipeline -------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale,steps", [(2.0, 20), (3.0, 50)])
def test_samples_are_classified_as_requested(
    pipe: DigitsPipeline, judge: DigitsJudge, scale: float, steps: int
) -> None:
    # (3.0, 50) guards DDIM's use_clipped_model_output: without it 27% of such samples were the requested digit.
    classes = [0, 3, 7]
    labels = [c for c in classes for _ in range(6)]
    gens = [torch.Generator().manual_seed(1000 + i) for i in range(len(labels))]
    x = pipe(labels, guidance_scale=scale, num_inference_steps=steps, generator=gens, output_type="latent").images
    assert x.shape == (len(labels), 1, 8, 8) and bool(torch.isfinite(x).all())
    hit = (judge.predict(x) == torch.tensor(labels)).float().mean().item()
    assert hit >= 0.8, f"only {hit:.0%} of the samples were judged to be the requested digit"


def test_batch_equals_items_one_at_a_time() -> None:
    labels = [1, 4, None]
    negatives = [7, None, 2]

    def gens() -> list[torch.Generator]:
        return [torch.Generator().manual_seed(s) for s in (5, 6, 7)]

    for name in ("ddim", "ddpm"):  # ddpm also draws per-step noise, from the per-item generators
        p = DigitsPipeline.from_bundled(scheduler=name)
        p.unet.to(torch.float64)  # the pipeline samples in its UNet's dtype
        kw = {"guidance_scale": 2.5, "num_inference_steps": 8, "output_type": "latent"}
        batch = p(labels, negative_class_labels=negatives, generator=gens(), **kw).images
        items = torch.cat(
            [
                p([c], negative_class_labels=[n], generator=[g], **kw).images
                for c, n, g in zip(labels, negatives, gens(), strict=True)
            ]
        )
        assert batch.dtype == items.dtype == torch.float64
        bound = LOOP_AMPLIFICATION * U64 * float(items.abs().max())
        assert float((batch - items).abs().max()) <= bound, (name, float((batch - items).abs().max()), bound)


def test_output_types_and_modes(pipe: DigitsPipeline) -> None:
    g = torch.Generator().manual_seed(0)
    pt = pipe([2, 5], num_inference_steps=4, generator=g, output_type="pt").images
    assert pt.shape == (2, 1, 8, 8) and float(pt.min()) >= 0.0 and float(pt.max()) <= 1.0
    np_img = pipe([2], num_inference_steps=4, output_type="np").images
    assert np_img.shape == (1, 8, 8, 1)
    pil = pipe([2], num_inference_steps=4, output_type="pil").images
    assert pil[0].size == (8, 8) and pil[0].mode == "L"
    # Unconditional: class None / batch_size, guidance 0 or 1 are one-branch runs with the null class.
    lat = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    a = pipe(None, batch_size=3, guidance_scale=1.0, num_inference_steps=4, latents=lat, output_type="latent").images
    b = pipe([None] * 3, guidance_scale=0.0, num_inference_steps=4, latents=lat, output_type="latent").images
    assert torch.equal(a, b)  # the same one-branch UNet calls on the same numbers
    # cond == uncond: guidance changes nothing but rounding (a two-branch batch of 6 against one of 3; compared in
    # float64, where the loop's amplification leaves it far below any real difference: see LOOP_AMPLIFICATION).
    p64 = DigitsPipeline.from_bundled()
    p64.unet.to(torch.float64)
    kw: dict[str, Any] = {"num_inference_steps": 4, "latents": lat.double(), "output_type": "latent"}
    a64 = p64(None, batch_size=3, guidance_scale=1.0, **kw).images
    c64 = p64([NULL_CLASS] * 3, guidance_scale=3.0, **kw).images
    assert float((a64 - c64).abs().max()) <= (1 + 2 * 3.0) * LOOP_AMPLIFICATION * U64 * float(a64.abs().max())
    with pytest.raises(ValueError, match="generators"):
        pipe([1, 2], generator=[torch.Generator()], num_inference_steps=2)
    with pytest.raises(ValueError, match="class_labels"):
        pipe([pipe.num_labels], num_inference_steps=2)  # one past the last class embedding
    assert pipe.null_class == NULL_CLASS and pipe.sample_shape == (1, 8, 8)


def test_scheduler_step_receives_guided_eps(pipe: DigitsPipeline) -> None:
    """``attach`` works by wrapping ``pipe.scheduler.step``: it must see every step's CFG-combined eps."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    original = pipe.scheduler.step

    def spy(model_output: torch.Tensor, timestep: torch.Tensor, sample: torch.Tensor, **kw: object) -> object:
        assert kw.get("use_clipped_model_output") is True  # forwarded through a **kwargs wrapper to DDIM
        seen.append((model_output.clone(), sample.clone()))
        return original(model_output, timestep, sample, **kw)

    pipe.scheduler.step = spy  # type: ignore[method-assign]
    try:
        lat = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))
        pipe([3, 8], guidance_scale=2.0, num_inference_steps=5, latents=lat, output_type="latent")
    finally:
        del pipe.scheduler.step  # back to the class method
    assert len(seen) == 5 and seen[0][0].shape == (2, 1, 8, 8)
    t0 = pipe.scheduler.timesteps[0]
    with torch.no_grad():
        e = pipe.unet(torch.cat([lat, lat]), t0, class_labels=torch.tensor([NULL_CLASS, NULL_CLASS, 3, 8])).sample
    eu, ec = e.chunk(2)
    assert torch.equal(seen[0][0], eu + 2.0 * (ec - eu))  # the same UNet call and CFG arithmetic: the same bits


def test_bundled_assets_are_small_and_safetensors() -> None:
    root = bundled_path()
    files = [p for p in root.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 10 * 2**20
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")]
    record = json.loads((root / "train_config.json").read_text())
    assert record["seed"] == 0 and record["final_loss_mean_100"] < record["first_loss_mean_20"]


# ---- training -------------------------------------------------------------------------------------
def test_training_step_lowers_loss_on_a_fixed_batch() -> None:
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    data = load_split("generator")
    x, y = data.images[:32], data.labels[:32]
    model = DigitsDiffusion(**TINY, lr=1e-2, warmup_steps=1, total_steps=8, ema_decay=0.5)  # type: ignore[arg-type]
    init = [p.detach().clone() for p in model.unet.parameters()]

    def fixed_loss() -> float:
        with torch.no_grad():
            return float(model.diffusion_loss(x, y, generator=torch.Generator().manual_seed(0)))

    before = fixed_loss()
    with pytest.warns(UserWarning, match="self.log"):  # no Trainer attached yet: logging is skipped
        assert float(model.training_step((x, y), 0).detach()) > 0
    loader = DataLoader(TensorDataset(x, y), batch_size=32)  # one batch, seen every step
    trainer = L.Trainer(
        accelerator="cpu", max_steps=8, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(model, loader)
    assert trainer.global_step == 8
    assert fixed_loss() < before
    moved = [not torch.equal(a, b) for a, b in zip(init, model.ema_unet.parameters(), strict=True)]
    assert all(moved)  # the EMA copy follows the trained weights


def test_train_entry_point_writes_a_loadable_pipeline(tmp_path: Path) -> None:
    record = train(tmp_path, max_steps=2, batch_size=16, sample_grid=False, **TINY)  # type: ignore[arg-type]
    assert (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (tmp_path / "scheduler" / "scheduler_config.json").is_file()
    assert record["max_steps"] == 2 and json.loads((tmp_path / "train_config.json").read_text())["seed"] == 0
    p = DigitsPipeline.from_pretrained_dir(tmp_path, scheduler="dpmpp")
    x = p([0, 1], num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="latent").images
    assert x.shape == (2, 1, 8, 8) and bool(torch.isfinite(x).all())

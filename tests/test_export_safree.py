"""SAFREE's text side in an exported bundle: numpy runtime (``export.safree_text``) vs the PyTorch SAFREE pipeline.

The bundle carries no SAFREE graph: the runtime computes the projection from ``text_encoder.onnx``'s outputs and the
concept basis in the manifest, and feeds the filtered or original prompt rows to the unchanged denoiser graph.
Tolerances: the text encoder's float32 error bound (``step_bounds.network_bound``, measured factor 6 for the tiny
CLIP) pushed through the projections (orthogonal projectors do not grow errors) for the filtered rows; the whole DDIM
loop within twice the rounding-sized perturbation of the PyTorch loop, as in ``test_export``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from safe_denoiser import NegativeBank, attach, detach
from safe_denoiser.core.safree import SafreeConfig, orthogonal_projector
from safe_denoiser.diffusers.safree_pipeline import attach_safree, concept_projector, detach_safree
from safe_denoiser.export.exporter import ExportSource, export_bundle, load_source
from safe_denoiser.runtime.bundle import Bundle
from safe_denoiser.runtime.manifest import Manifest
from safe_denoiser.runtime.safree_text import SafreeSettings, orthonormal_basis, safree_prompt
from safe_denoiser.testing import tiny_sd_pipeline

from step_bounds import network_bound, perturbed

HW, STEPS, W = 16, 5, 7.5
PROMPTS = ["a photo of a nude woman", "a red car"]
CONCEPTS = ("nudity", "naked body", "sexual")
SAFREE = {"concepts": list(CONCEPTS), "svf_max_step": 2, "svf_midpoint": 0.0, "re_attention": False}  # t' = 2


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[ExportSource, Manifest, Path]:
    work = tmp_path_factory.mktemp("safree")
    pipe = tiny_sd_pipeline(seed=0)
    gens = [torch.Generator().manual_seed(s) for s in (0, 1, 2)]
    lat = pipe(
        ["a photo of a woman"] * 3, num_inference_steps=STEPS, height=HW, width=HW, generator=gens, output_type="latent"
    ).images
    bank = NegativeBank.from_tensor(lat).save(work / "bank.safetensors")
    args = {
        "model": "tiny-sd",
        "scheduler": "ddim",
        "num_inference_steps": STEPS,
        "guidance_scale": W,
        "height": HW,
        "width": HW,
        "bank": str(bank),
        "safe_denoiser": {"preset": "constant", "beta": 1.0, "window": [0, 1000]},
        "safree": SAFREE,
    }
    source = load_source(args)
    return source, export_bundle(source, work / "bundle"), work / "bundle"


def test_manifest_carries_the_concept_subspace(bundle: tuple[ExportSource, Manifest, Path]) -> None:
    source, manifest, _ = bundle
    assert manifest.safree is not None and manifest.safree.concepts == tuple(CONCEPTS)
    assert manifest.safree.vocab_size == source.pipe.text_encoder.config.vocab_size
    basis = manifest.safree.concept_basis
    assert basis.shape == (32, len(CONCEPTS))
    np.testing.assert_allclose(basis.T @ basis, np.eye(len(CONCEPTS)), atol=1e-6)  # orthonormal
    want = concept_projector(source.pipe, CONCEPTS).numpy()
    np.testing.assert_allclose(basis @ basis.T, want, atol=1e-6)  # the PyTorch side's P_C


def test_numpy_text_side_equals_pytorch_on_the_same_inputs() -> None:
    """``safree_prompt`` against ``core.safree.safree_tokens`` on float64 inputs (rounding-free comparison)."""
    from safe_denoiser.core.safree import safree_tokens

    rng = np.random.default_rng(0)
    cfg = SafreeConfig(concepts=CONCEPTS, alpha=0.01)
    for _ in range(20):
        tokens, masked, concepts = rng.standard_normal((8, 6)), rng.standard_normal((4, 6)), rng.standard_normal((2, 6))
        masked[0] += 3 * concepts[0]  # one masked prompt near the subspace: detection has both outcomes
        active = np.arange(8) < 6
        settings = SafreeSettings(orthonormal_basis(concepts), alpha=cfg.alpha, svf_midpoint=cfg.svf_midpoint)
        got = safree_prompt(tokens, masked, active, settings)
        p_c = orthogonal_projector(torch.from_numpy(concepts))
        want, flags, last = safree_tokens(
            torch.from_numpy(tokens), torch.from_numpy(masked), torch.from_numpy(active), p_c, cfg
        )
        assert got.triggers == tuple(flags.tolist()) and got.last_step == last
        np.testing.assert_allclose(got.filtered, want.numpy(), rtol=0, atol=1e-12)
        assert np.array_equal(
            got.filtered[~np.isin(np.arange(8), np.flatnonzero(flags) + 1)],
            tokens[~np.isin(np.arange(8), np.flatnonzero(flags) + 1)],
        )


def _run(pipe: Any, noise: torch.Tensor) -> np.ndarray:
    return pipe(
        PROMPTS, num_inference_steps=STEPS, height=HW, width=HW, guidance_scale=W, latents=noise, output_type="latent"
    ).images.numpy()


def test_bundle_sampling_equals_the_safree_pipeline(bundle: tuple[ExportSource, Manifest, Path]) -> None:
    """SAFREE (text side) + safe denoiser: onnxruntime + numpy vs ``attach_safree`` + ``attach`` in PyTorch."""
    source, manifest, out = bundle
    pipe = source.pipe
    noise = torch.randn((2, *manifest.sample_shape), generator=torch.Generator().manual_seed(3))
    assert source.safree is not None and source.bank is not None
    handle = attach_safree(pipe, source.safree)
    attach(pipe, source.bank, source.guidance)
    try:
        want = _run(pipe, noise)
        records = list(handle.records)
        filtered_pt = handle.filtered_embeddings
        assert filtered_pt is not None
        with perturbed(pipe.unet):
            moved = _run(pipe, noise)
    finally:
        detach(pipe)
        detach_safree(pipe)
    plain = _run(pipe, noise)
    got = Bundle(out).sample(PROMPTS, noise=noise.numpy(), steps=STEPS, guidance_scale=W)
    assert got.safree is not None
    assert [r.triggers for r in got.safree] == [r.triggers for r in records]
    assert [r.last_step for r in got.safree] == [r.last_step for r in records]
    assert records[0].filtered and 0 < records[0].last_step < STEPS - 1  # both phases happen
    bound = 2 * network_bound(filtered_pt.numpy())  # text encoder rounding, twice (runtime and PyTorch)
    for b in range(2):
        assert np.abs(got.safree[b].filtered - filtered_pt[b].numpy()).max() <= bound
    r, err = rel_err(moved, want), rel_err(got.sample, want)
    print(f"SAFREE loop: onnxruntime vs PyTorch rel err {err:.3g}, rounding-sized perturbation {r:.3g}")
    assert 0 < r < 1e-3 and err <= 2 * r
    assert rel_err(plain, want) > 10 * r  # SAFREE + the correction changed the samples beyond rounding
    emb = Bundle(out).encode(PROMPTS)  # precomputed embeddings pass through unfiltered, as in PyTorch
    assert Bundle(out).sample(emb, noise=noise.numpy(), steps=STEPS).safree is None


def test_reattention_is_refused_at_export(bundle: tuple[ExportSource, Manifest, Path], tmp_path: Path) -> None:
    source, _, _ = bundle
    args = {**source.model_args, "safree": {**SAFREE, "re_attention": True}}
    with pytest.raises(ValueError, match=r"model.safree.re_attention: the latent re-attention is not exported"):
        export_bundle(load_source(args), tmp_path / "x")

"""Export parity for the SD-1.4 architecture (random weights, CPU, 16x16 latents = 128x128 pixels).

The UNet has ~860M parameters (3.4 GB in fp32), so ``denoiser.onnx`` keeps its weights in one external-data file.
The test takes about 3.5 minutes and 12 GB (peak RSS) on two CPU cores (building the pipeline, exporting the three
graphs, an onnxruntime session, PyTorch steps and loops, and a float64 copy of the UNet for the step's reference).

Tolerances as in test_export.py (``step_bounds``): the text encoder and VAE decoder graphs within twice the network
rounding bound of PyTorch; the denoiser step within the float32 error bound of the float64 PyTorch step, element by
element; the final latents within twice the relative change that rounding-sized UNet perturbations cause.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from safe_denoiser import NegativeBank, attach, detach
from safe_denoiser.export.exporter import ExportOptions, build_denoiser, denoiser_inputs, export_bundle, load_source
from safe_denoiser.runtime.bundle import Bundle
from safe_denoiser.runtime.manifest import BANK_INITIALIZER, read_initializer

from step_bounds import network_bound, perturbed, step_reference, within

LATENT = 16
STEPS = 2


@pytest.fixture(scope="module", autouse=True)
def _two_threads() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(n)


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_sd14_architecture_export_parity(tmp_path: Path) -> None:
    bank = NegativeBank.from_tensor(torch.randn(8, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(0)))
    bank_path = bank.save(tmp_path / "bank.safetensors")
    args = {
        "model": "sd14-random",
        "scheduler": "ddim",
        "num_inference_steps": STEPS,
        "guidance_scale": 7.5,
        "height": 8 * LATENT,
        "width": 8 * LATENT,
        "bank": str(bank_path),
        "safe_denoiser": {"preset": "constant", "beta": 0.5, "window": [0, 800]},
    }
    source = load_source(args)
    out = tmp_path / "sd14"
    manifest = export_bundle(source, out, ExportOptions(verify=False))
    assert manifest.graphs["denoiser"].external_data == "denoiser.onnx.data"
    assert (out / "denoiser.onnx.data").stat().st_size > 3 * 2**30
    assert np.array_equal(read_initializer(out / "denoiser.onnx", BANK_INITIALIZER), bank.data.numpy())

    bundle = Bundle(out, threads=2)
    # Text encoder graph.
    emb = bundle.encode(["a photo of an astronaut"])
    tok = source.pipe.tokenizer
    ids = tok(["a photo of an astronaut"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        ref_emb = source.pipe.text_encoder(ids)[0].numpy()
    te_diff = float(np.abs(emb - ref_emb).max())
    neg = np.zeros_like(emb)
    # One denoiser step (inputs inside and outside the window), onnxruntime now; its reference at the end.
    step = build_denoiser(source)
    inputs = denoiser_inputs(source, step, 2, seed=3)
    names = manifest.graphs["denoiser"].output_names
    got = bundle.session("denoiser").run(names, {n: v.numpy() for n, v in zip(step.input_names, inputs, strict=True)})
    # The whole loop.
    noise = torch.randn(1, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(0))
    res = bundle.sample(emb, noise=noise.numpy(), negative=neg)
    handle = attach(source.pipe, source.bank, source.guidance, record=True)

    def sample() -> np.ndarray:
        with torch.no_grad():
            return source.pipe(
                prompt_embeds=torch.from_numpy(emb),
                negative_prompt_embeds=torch.from_numpy(neg),
                guidance_scale=7.5,
                num_inference_steps=STEPS,
                latents=noise,
                height=8 * LATENT,
                width=8 * LATENT,
                output_type="latent",
            ).images.numpy()

    try:
        lat = sample()
        applied = torch.stack([tr.record.applied for tr in handle.records]).numpy()
        with perturbed(source.pipe.unet):
            moved = sample()
    finally:
        detach(source.pipe)
    err, loop_bound = rel_err(res.sample, lat), 2 * rel_err(moved, lat)
    with torch.no_grad():
        img = source.pipe.vae.decode(torch.from_numpy(lat) / 0.18215).sample.numpy()
    vae_diff = float(np.abs(bundle.decode(lat) - img).max())
    del bundle  # the onnxruntime sessions (3.4 GB of weights) before the float64 UNet (6.9 GB)
    gc.collect()
    with torch.no_grad():
        torch32 = [r.numpy() for r in step(*inputs)]
    ref, bound = step_reference(step, inputs)
    print(
        f"sd14: text_encoder {te_diff:.2e}, vae_decoder {vae_diff:.2e}, loop rel err {err:.2e} (bound {loop_bound:.2e})"
    )
    assert te_diff <= 2 * network_bound(ref_emb)
    for n, g, t in zip(names, got, torch32, strict=True):
        if n in bound:
            print(
                f"sd14 denoiser.{n}: max |ORT - float64| {np.abs(g - ref[n]).max():.2e}, max bound {bound[n].max():.2e}"
            )
            assert within(g, ref[n], bound[n]) and within(t, ref[n], bound[n]), n
        else:
            assert np.array_equal(g, ref[n]) and np.array_equal(t, ref[n]), n
    assert vae_diff <= 2 * network_bound(img)
    assert err <= loop_bound
    assert res.applied is not None and np.array_equal(res.applied, applied) and applied.all()

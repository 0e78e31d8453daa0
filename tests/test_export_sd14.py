"""Export parity for the SD-1.4 architecture (random weights, CPU, 16x16 latents = 128x128 pixels).

The UNet has ~860M parameters (3.4 GB in fp32), so ``denoiser.onnx`` keeps its weights in one external-data file.
Measured on this project's 2-core CPU machine: building the pipeline ~20 s, exporting the three graphs ~110 s,
opening the onnxruntime session ~20 s, one PyTorch step for the graph check ~25 s, two DDIM steps ~5 s
(onnxruntime) and ~25 s (PyTorch), peak RSS 9.3 GB: 206 s in all, over the suite's ~90 s budget, so the test runs
in every run (about 3.5 minutes and 9.3 GB on two CPU cores).

Tolerances as in test_export.py: final latents within 1e-4 relative of the PyTorch pipeline (``attach``, same
initial noise); each graph within 1e-4 x max(1, max |PyTorch output|).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from safe_denoiser import NegativeBank, attach, detach
from safe_denoiser.export.exporter import ExportOptions, build_denoiser, denoiser_inputs, export_bundle, load_source
from safe_denoiser.export.manifest import BANK_INITIALIZER, read_initializer
from safe_denoiser.export.runtime import Bundle

LATENT = 16
STEPS = 2
TOL = 1e-4


@pytest.fixture(scope="module", autouse=True)
def _two_threads() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(n)


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
        "safe_denoiser": {"preset": "theorem", "eta": 0.5, "window": [0, 800]},
    }
    source = load_source(args)
    out = tmp_path / "sd14"
    manifest = export_bundle(source, out, ExportOptions(verify=False))
    assert manifest.graphs["denoiser"].external_data == "denoiser.onnx.data"
    assert (out / "denoiser.onnx.data").stat().st_size > 3 * 2**30
    assert np.array_equal(read_initializer(out / "denoiser.onnx", BANK_INITIALIZER), bank.data.numpy())

    bundle = Bundle(out, threads=2)
    # Text encoder and VAE decoder graphs.
    emb = bundle.encode(["a photo of an astronaut"])
    tok = source.pipe.tokenizer
    ids = tok(["a photo of an astronaut"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        ref_emb = source.pipe.text_encoder(ids)[0].numpy()
    te_diff = float(np.abs(emb - ref_emb).max())
    neg = np.zeros_like(emb)
    # One denoiser step against the PyTorch module (inputs inside and outside the window).
    step = build_denoiser(source)
    inputs = denoiser_inputs(source, step, 2, seed=3)
    names = manifest.graphs["denoiser"].output_names
    got = bundle.session("denoiser").run(names, {n: v.numpy() for n, v in zip(step.input_names, inputs, strict=True)})
    with torch.no_grad():
        ref = [r.numpy() for r in step(*inputs)]
    step_diff = {n: float(np.abs(g.astype(np.float64) - r).max()) for n, g, r in zip(names, got, ref, strict=True)}
    # The whole loop.
    noise = torch.randn(1, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(0))
    res = bundle.sample(emb, noise=noise.numpy(), negative=neg)
    handle = attach(source.pipe, source.bank, source.guidance, record=True)
    try:
        with torch.no_grad():
            lat = source.pipe(
                prompt_embeds=torch.from_numpy(emb),
                negative_prompt_embeds=torch.from_numpy(neg),
                guidance_scale=7.5,
                num_inference_steps=STEPS,
                latents=noise,
                height=8 * LATENT,
                width=8 * LATENT,
                output_type="latent",
            ).images.numpy()
        applied = torch.stack([tr.record.applied for tr in handle.records]).numpy()
    finally:
        detach(source.pipe)
    err = float(np.linalg.norm(res.sample - lat) / np.linalg.norm(lat))
    with torch.no_grad():
        img = source.pipe.vae.decode(torch.from_numpy(lat) / 0.18215).sample.numpy()
    vae_diff = float(np.abs(bundle.decode(lat) - img).max())
    print(f"sd14: text_encoder {te_diff:.2e}, denoiser {step_diff}, vae_decoder {vae_diff:.2e}, loop rel err {err:.2e}")
    assert te_diff <= TOL * max(1.0, float(np.abs(ref_emb).max()))
    for n, r in zip(names, ref, strict=True):
        limit = 0.0 if r.dtype == np.bool_ else TOL * max(1.0, float(np.abs(r).max()))
        assert step_diff[n] <= limit, (n, step_diff[n])
    assert vae_diff <= TOL * max(1.0, float(np.abs(img).max()))
    assert err <= TOL
    assert res.applied is not None and np.array_equal(res.applied, applied) and applied.all()

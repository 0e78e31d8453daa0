"""The miniature Stable Diffusion (``model: mini-sd``, docs/mini_sd.md) served: exported with ``safe-denoiser
export`` from its shipped configs, then run by the Python runtime and by ``safe-denoiser-cpp``.

- PyTorch vs the Python runtime (``Bundle``): the pipeline with the safe denoiser attached (and SLD for the SLD
  bundle) on the same noise and the bundle's prompt embeddings; the final latents within twice the loop's measured
  sensitivity to rounding-sized UNet errors (``step_bounds.perturbed``), the steps where the correction fired equal.
- Python vs C++: the tokenizer on the trained vocabulary (C++ ``tokenize`` = the bundle's ``tokenizer.json`` through
  transformers = the pipeline's ``CLIPTokenizer``), then ``generate``, ``batch`` and the server's
  ``/v1/images/generations`` give the PNG bytes of the Python runtime, for prompts that ask for the concept (8) and
  for other digits, with and without a negative prompt: the safe denoiser alone (SAFREE off), with SLD, and with
  SAFREE's text side (its latent re-attention is not exported).

The C++ binary is ``make cpp``'s or $SAFE_DENOISER_CPP_BINARY (test_cpp_runtime's fixture). About 60 s on 2 cores,
most of it the three exports.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from test_cpp_runtime import PARITY_RTOL, Server, cpp, rel_err, run

from safe_denoiser import attach, attach_sld, detach, detach_sld
from safe_denoiser.cli import main as cli_main
from safe_denoiser.export.source import ExportSource, load_source, read_model_section
from safe_denoiser.runtime.bundle import Bundle, ddim_timesteps
from safe_denoiser.runtime.manifest import Manifest
from safe_denoiser.runtime.png import png_bytes

from step_bounds import network_bound, perturbed

__all__ = ["cpp"]  # the binary fixture, imported for pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"safe": "mini_sd_safe.yaml", "sld": "mini_sd_sld_safe.yaml"}
# SAFREE's text side on the safe config: the concept phrases in the miniature's own grammar.
SAFREE = {"concepts": ["a handwritten eight", "the number 8", "a figure eight", "eight"], "re_attention": False}
# (prompt, negative prompt or None): the concept in two phrasings, other digits, a group, an unseen phrasing.
CASES = [
    ("a handwritten eight", None),
    ("the number 8 in bold strokes", "a thin digit"),
    ("a thin slanted seven", None),
    ("a handwritten three", "a handwritten eight"),
    ("a digit with a loop", "a figure eight"),
]
SEEDS = (0, 7)
TOKENIZER_TEXTS = [
    "",
    "a handwritten eight",
    "the number 8 in bold strokes",
    "a figure eight",
    "an eight or a three",
    "any digit",
    "A Handwritten EIGHT, please!",
    "a wobbly 8 drawn by hand (no sevens)",
]


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    # The UNet is tiny (8 x 8 latents): on a busy two-core machine a second thread costs more than it gives (measured
    # 0.9 s vs 3.7 s for one 25-step loop).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _export(config: Path, out: Path) -> Path:
    """``safe-denoiser export --config CONFIG --out OUT`` (the graphs' checks against PyTorch are this module's)."""
    assert cli_main(["export", "--config", str(config), "--out", str(out), "--no-verify"]) == 0
    return out


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("mini_sd_bundles")
    out = {name: _export(ROOT / "configs" / file, work / name) for name, file in CONFIGS.items()}
    config = yaml.safe_load((ROOT / "configs" / CONFIGS["safe"]).read_text(encoding="utf-8"))
    config["model"]["safree"] = SAFREE
    (work / "safree.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    out["safree"] = _export(work / "safree.yaml", work / "safree")
    return out


def _source(name: str) -> ExportSource:
    return load_source(read_model_section(ROOT / "configs" / CONFIGS[name]))


def test_exported_manifests(bundles: dict[str, Path]) -> None:
    for name, folder in bundles.items():
        m = Manifest.load(folder)
        assert (m.model_kind, m.source, m.sample_shape, m.tokenizer) == (
            "text-to-image",
            "mini-sd",
            (4, 8, 8),
            "tokenizer",
        )
        assert m.guidance is not None and m.guidance.preset == "odds" and m.reference_bank is not None, name
        assert (m.sld is not None) == (name == "sld") and (m.safree is not None) == (name == "safree"), name
        assert set(m.graphs) == {"denoiser", "text_encoder", "vae_decoder"}, name


@pytest.mark.parametrize("name", list(CONFIGS))
def test_python_runtime_equals_pytorch_pipeline(bundles: dict[str, Path], name: str) -> None:
    """Bundle.sample vs the diffusers pipeline with ``attach`` (and ``attach_sld``), the same noise and embeddings."""
    source = _source(name)
    pipe = source.pipe
    bundle = Bundle(bundles[name], threads=1)
    prompts = [p for p, _ in CASES]
    negatives = [n or "" for _, n in CASES]
    emb, neg = bundle.encode(prompts), bundle.encode(negatives)
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        want_emb = pipe.text_encoder(ids)[0].numpy()
    assert np.abs(emb - want_emb).max() <= 2 * network_bound(want_emb)  # two float32 text encoders
    noise = torch.randn(len(prompts), 4, 8, 8, generator=torch.Generator().manual_seed(3))
    got = bundle.sample(emb, noise=noise.numpy(), negative=neg)
    if source.sld is not None:
        attach_sld(pipe, source.sld, source.sld_concept)
    assert source.bank is not None
    handle = attach(pipe, source.bank, source.guidance, record=True, reference=source.reference_bank)

    def sample() -> np.ndarray:
        with torch.no_grad():
            return pipe(
                prompt_embeds=torch.from_numpy(emb),
                negative_prompt_embeds=torch.from_numpy(neg),
                guidance_scale=bundle.manifest.guidance_scale,
                num_inference_steps=bundle.manifest.num_inference_steps,
                latents=noise,
                output_type="latent",
            ).images.numpy()

    try:
        want = sample()
        applied = torch.stack([tr.record.applied for tr in handle.records]).numpy()
        with perturbed(pipe.unet):  # all branches (SLD wraps this UNet): the loop's sensitivity to rounding
            moved = sample()
    finally:
        detach(pipe)
        if source.sld is not None:
            detach_sld(pipe)
    err, tol = rel_err(got.sample, want), 2 * rel_err(moved, want)
    print(
        f"mini-sd {name}: Bundle vs PyTorch rel err {err:.2e} (bound {tol:.2e}), fired {int(applied.sum())} step-images"
    )
    assert err <= tol
    assert got.applied is not None and np.array_equal(got.applied, applied) and applied.any()
    with torch.no_grad():
        img = pipe.vae.decode(torch.from_numpy(got.sample) / pipe.vae.config.scaling_factor).sample.numpy()
    assert np.abs(bundle.decode(got.sample) - img).max() <= 2 * network_bound(img)  # two float32 VAE decoders


def test_cpp_tokenizer_equals_the_pipelines(cpp: Path, bundles: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoTokenizer, CLIPTokenizer

    from safe_denoiser.mini_sd.data import ASSETS_DIR

    folder = bundles["safe"] / "tokenizer"
    texts = tmp_path / "texts.json"
    texts.write_text(json.dumps(TOKENIZER_TEXTS), encoding="utf-8")
    got = json.loads(run(cpp, "tokenize", "--tokenizer", str(folder), "--texts", str(texts)).stdout)
    for tok in (AutoTokenizer.from_pretrained(str(folder)), CLIPTokenizer.from_pretrained(ASSETS_DIR / "tokenizer")):
        want = tok(TOKENIZER_TEXTS, padding="max_length", max_length=77, truncation=True).input_ids
        for text, g, w in zip(TOKENIZER_TEXTS, got, want, strict=True):
            assert g == w, (type(tok).__name__, text)


def python_png(bundle: Bundle, prompts: list[str], negatives: list[str], seeds: list[int]) -> tuple[Any, list[bytes]]:
    """Bundle.sample with one seed per image (item 0), and each image's PNG bytes."""
    res = bundle.sample(prompts, negative=negatives, seed=seeds)
    images = Bundle.to_uint8(bundle.decode(res.sample))
    return res, [png_bytes(image) for image in images]


@pytest.mark.parametrize("name", ["safe", "sld", "safree"])
def test_cpp_generate_equals_python(cpp: Path, bundles: dict[str, Path], tmp_path: Path, name: str) -> None:
    folder = bundles[name]
    bundle = Bundle(folder, threads=1)
    timesteps = ddim_timesteps(bundle.manifest.scheduler, bundle.manifest.num_inference_steps)
    for (prompt, negative), seed in [(case, seed) for case in CASES for seed in SEEDS]:
        res, (want_png,) = python_png(bundle, [prompt], [negative or ""], [seed])
        out = tmp_path / "g.png"
        extra = [] if negative is None else ["--negative-prompt", negative]
        args = ["--prompt", prompt, *extra, "--seed", str(seed), "--threads", "1", "--out", str(out)]
        run(cpp, "generate", "--bundle", str(folder), *args, "--sample-out", str(tmp_path / "g.npy"))
        assert rel_err(np.load(tmp_path / "g.npy"), res.sample) <= PARITY_RTOL, (name, prompt, seed)
        assert out.read_bytes() == want_png, (name, prompt, seed)
        record = json.loads(out.with_suffix(".json").read_text())
        assert res.applied is not None
        assert record["corrected_steps"] == [int(t) for t, a in zip(timesteps, res.applied[:, 0], strict=True) if a]


def test_cpp_batch_equals_python(cpp: Path, bundles: dict[str, Path], tmp_path: Path) -> None:
    """One JSONL batch of four requests (one ONNX Runtime batch) = Bundle.sample of the same four."""
    folder = bundles["sld"]
    reqs = [{"id": f"r{i}", "prompt": p, "negative_prompt": n or "", "seed": 11 + i} for i, (p, n) in enumerate(CASES)]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reqs[:4]), encoding="utf-8")
    out = tmp_path / "out"
    out.mkdir()
    args = ["--requests", str(tmp_path / "r.jsonl"), "--out-dir", str(out), "--max-batch", "4", "--threads", "1"]
    run(cpp, "batch", "--bundle", str(folder), *args)
    _, want = python_png(
        Bundle(folder, threads=1),
        [r["prompt"] for r in reqs[:4]],
        [r["negative_prompt"] for r in reqs[:4]],
        [11, 12, 13, 14],
    )
    for r, png in zip(reqs[:4], want, strict=True):
        assert json.loads((out / f"{r['id']}.json").read_text())["batch_size"] == 4
        assert (out / f"{r['id']}.png").read_bytes() == png, r


def test_openai_images_request_equals_generate(cpp: Path, bundles: dict[str, Path], tmp_path: Path) -> None:
    """The README's request: ``/v1/images/generations`` for the concept. n = 1 equals ``generate``; n = 2 (one ONNX
    Runtime batch) equals the Python runtime's batch of two. Across batch shapes only the noise is shared: onnxruntime
    rounds a batch's rows differently (1e-5), and the odds preset makes some concept trajectories diverge from such
    differences (latents up to 1e9 in PyTorch as well), so image 1 of n = 2 need not equal ``generate --item 1``."""
    folder = bundles["safe"]
    server = Server(cpp, folder)
    answers = []
    try:
        for n in (1, 2):  # one after the other: the worker never joins them into one batch
            payload = {"prompt": "a handwritten eight", "n": n, "size": "32x32", "seed": 5}
            status, body = server.request("POST", "/v1/images/generations", json.dumps(payload).encode())
            assert status == 200, body
            answers.append(json.loads(body))
    finally:
        server.stop()
    assert all(set(a) == {"created", "data"} for a in answers)
    one, two = ([base64.b64decode(e["b64_json"]) for e in a["data"]] for a in answers)
    out = tmp_path / "g.png"
    run(cpp, "generate", "--bundle", str(folder), "--prompt", "a handwritten eight", "--seed", "5", "--out", str(out))
    assert one == [out.read_bytes()]
    bundle = Bundle(folder, threads=1)
    images = Bundle.to_uint8(bundle.decode(bundle.sample(["a handwritten eight"] * 2, seed=5).sample))
    assert two == [png_bytes(image) for image in images]


def test_bundle_pipeline_gives_the_runtimes_images(bundles: dict[str, Path]) -> None:
    """The table's generator (``quality.generate_prompts``) over ``BundlePipeline``: each image is the runtime's own
    sample of that prompt and seed (same call, bit for bit), in the table's [-1, 1] form; bad calls say why."""
    from types import SimpleNamespace

    from safe_denoiser.mini_sd.quality import generate_prompts
    from safe_denoiser.mini_sd.table.bundle_pipeline import BundlePipeline

    bundle = Bundle(bundles["safe"], threads=1)
    prompts, seeds = [p for p, _ in CASES[:3]], [5, 9, 11]
    got = generate_prompts(BundlePipeline(bundle), prompts, seeds, 5.0, 4, batch=3, negative_prompt="a figure eight")
    raw = bundle.sample(prompts, steps=4, guidance_scale=5.0, negative=["a figure eight"] * 3, seed=seeds).sample
    want = torch.from_numpy(bundle.decode(raw)).div(2).add(0.5).clamp(0, 1) * 2 - 1
    assert got.shape == (3, 3, 32, 32) and torch.equal(got, want)
    assert not torch.equal(got[0], got[1])  # different prompts and seeds: different images
    with pytest.raises(ValueError, match=r"one torch\.Generator per prompt"):
        BundlePipeline(bundle)(prompts, generator=[torch.Generator()])
    with pytest.raises(ValueError, match="needs a text bundle"):
        BundlePipeline(SimpleNamespace(manifest=SimpleNamespace(model_kind="class-conditional"), path="demo"))

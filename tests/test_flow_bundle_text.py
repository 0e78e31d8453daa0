"""Flow bundles (SD3, Flux) from a prompt to an image without PyTorch: text_encoder.onnx, the tokenizers, the
vae_decoder.onnx, and ``Bundle.sample_flow(prompts=...)`` against the diffusers pipelines (docs/bundle_format.md,
"Flow bundles").

Bounds (``step_bounds``): a float32 network lies within ``network_bound`` (NETWORK_DEPTH u32 max|output|) of its
float64 value, so the exported text encoder and decoder lie within that of the float64 pipeline. A whole loop: the
pipeline rerun with every transformer output moved by NETWORK_DEPTH u32 max|output| (``perturbed``) changes the
final sample by r_net, and rerun with its prompt embeddings moved by ``network_bound`` (the text encoders' float32
error) by r_text; each float32 implementation lies within r_net + r_text of the exact loop, two within twice that.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from safe_denoiser import NegativeBank, attach, detach
from safe_denoiser.export.exporter import ExportOptions, ExportSource, export_bundle, load_source
from safe_denoiser.export.flow_text import FlowTokenizer, save_tokenizer
from safe_denoiser.runtime.bundle import Bundle, run_bundle
from safe_denoiser.runtime.flow_bundle import tokenize_flow
from safe_denoiser.runtime.manifest import Manifest, ManifestError
from safe_denoiser.runtime.noise import INITIAL_STREAM, gaussian_noise
from safe_denoiser.runtime.tokenizer_spec import TokenizerSpec, TokenizerSpecError
from safe_denoiser.testing import tiny_pipeline, tiny_sd3_pipeline

from step_bounds import network_bound, perturbed

HW, STEPS, SEED = 16, 4, 7
SCALE = {"sd3": 5.0, "flux": 3.5}
PROMPTS = ["a photo of a cat", "", "ünïcödé 3.14 " + "a very long prompt that is truncated " * 40]
NEGATIVES = ["blurry", "low quality, text", ""]


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def _unguided_bank(pipe: Any, prompts: list[str], seeds: list[int], path: Path) -> Path:
    """A bank of the pipeline's own unguided outputs (unpacked latents, as banks are)."""
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    lat = pipe(prompts, num_inference_steps=STEPS, height=HW, width=HW, generator=gens, output_type="latent").images
    if "Flux" in type(pipe).__name__:
        lat = pipe._unpack_latents(lat, HW, HW, pipe.vae_scale_factor)
    return NegativeBank.from_tensor(lat).save(path)


@pytest.fixture(scope="module", params=["sd3", "flux"])
def family(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def banks(family: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    work = tmp_path_factory.mktemp(f"banks-{family}")
    pipe = tiny_pipeline(family)
    bank = _unguided_bank(pipe, ["a photo of a cat"] * 3, [0, 1, 2], work / "bank.safetensors")
    reference = _unguided_bank(pipe, ["a red car", "a dog", "a house"], [3, 4, 5], work / "reference.safetensors")
    return bank, reference


def _args(family: str, bank: Path) -> dict[str, Any]:
    return {
        "model": f"tiny-{family}",
        "scheduler": "flow_euler",
        "num_inference_steps": STEPS,
        "guidance_scale": SCALE[family],
        "height": HW,
        "width": HW,
        "bank": str(bank),
        "safe_denoiser": {"preset": "constant", "beta": 1.0, "window": [0, 1000]},
    }


@pytest.fixture(scope="module", params=["constant", "odds"])
def exported(
    request: pytest.FixtureRequest, family: str, banks: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[ExportSource, Manifest, Path]:
    """A bundle of the tiny pipeline with the constant preset, or the odds preset with a reference bank."""
    args = _args(family, banks[0])
    if request.param == "odds":
        args.update(reference_bank=str(banks[1]), safe_denoiser={"preset": "odds", "odds_scale": 1.0})
    source = load_source(args)
    out = tmp_path_factory.mktemp(f"bundle-{family}-{request.param}") / "bundle"
    return source, export_bundle(source, out), out


def _float64_embeddings(pipe: Any, prompts: list[str], **kw: Any) -> tuple[np.ndarray, np.ndarray]:
    """The pipeline's own encode_prompt with its text encoders in float64."""
    p64 = copy.copy(pipe)
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        enc = getattr(pipe, name, None)
        if enc is not None:
            object.__setattr__(p64, name, copy.deepcopy(enc).double())
    return _pipeline_embeddings(p64, prompts, **kw)


def _pipeline_embeddings(pipe: Any, prompts: list[str], **kw: Any) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        if "Flux" in type(pipe).__name__:
            pe, pooled, _ = pipe.encode_prompt(prompts, None, **kw)
        else:
            pe, _, pooled, _ = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=False, **kw)
    return pe.double().numpy(), pooled.double().numpy()


def test_manifest_lists_graphs_and_tokenizers(exported: tuple[ExportSource, Manifest, Path]) -> None:
    source, manifest, out = exported
    assert set(manifest.graphs) == {"denoiser", "text_encoder", "vae_decoder"} and manifest.tokenizer is None
    # the kind follows the class: the tiny Flux's T5 slot held a CLIP tokenizer before it got a SentencePiece one
    kind_2 = "t5" if type(source.pipe.tokenizer_2).__name__.startswith("T5") else "clip"
    want = [("tokenizer", "clip", "input_ids", 77), ("tokenizer_2", kind_2, "input_ids_2", 512)]
    if source.family == "sd3":  # two CLIP tokenizers, then T5's (256) if it has one (else zeros inside the graph)
        want[1] = ("tokenizer_2", "clip", "input_ids_2", 77)
        if source.pipe.text_encoder_3 is not None:
            kind_3 = "t5" if type(source.pipe.tokenizer_3).__name__.startswith("T5") else "clip"
            want.append(("tokenizer_3", kind_3, "input_ids_3", 256))
    assert [(s.folder, s.kind, s.input, s.max_length) for s in manifest.tokenizers] == want
    assert manifest.graphs["text_encoder"].input_names == [s.input for s in manifest.tokenizers]
    assert manifest.graphs["text_encoder"].output_names == ["prompt_embeds", "pooled_prompt_embeds"]
    assert manifest.graphs["vae_decoder"].input_names == ["latents"]
    for spec in manifest.tokenizers:
        assert f"{spec.folder}/{spec.required_file}" in manifest.files
    assert {"text_encoder.onnx", "vae_decoder.onnx"} <= set(manifest.files)
    stored = json.loads((out / "manifest.json").read_text())["tokenizers"]
    tok = source.pipe.tokenizer
    assert stored[0] == {
        "folder": "tokenizer",
        "kind": "clip",
        "input": "input_ids",
        "max_length": 77,
        "pad_id": tok.pad_token_id,
        "eos_id": tok.eos_token_id,
        "bos_id": tok.bos_token_id,
        "padding": "max_length",
        "truncation": True,
    }
    assert Manifest.load(out) == manifest
    _check_special_ids(source.pipe, manifest)


def _check_special_ids(pipe: Any, manifest: Manifest) -> None:
    """Each entry's recorded ids are its pipeline tokenizer's, looked up by token (SD3's CLIP-G pads with "!")."""
    for spec in manifest.tokenizers:
        tok = getattr(pipe, spec.folder)
        eos, pad = ("</s>", "<pad>") if spec.kind == "t5" else ("<|endoftext|>", tok.pad_token)
        assert (spec.eos_id, spec.pad_id) == tuple(tok.convert_tokens_to_ids([eos, pad])), spec
        if spec.kind == "clip":
            assert spec.bos_id == tok.convert_tokens_to_ids("<|startoftext|>") and spec.extra_ids == 0
        else:  # the sentinels <extra_id_0..N-1>: the last N ids
            assert spec.bos_id is None and spec.extra_ids == 100
            assert tok.convert_tokens_to_ids("<extra_id_0>") == len(tok) - 1
    if manifest.flow and manifest.flow["family"] == "sd3":
        clip_g = manifest.tokenizers[1]
        assert pipe.tokenizer_2.pad_token == "!" and clip_g.pad_id != clip_g.eos_id


def test_text_encoder_is_encode_prompt(exported: tuple[ExportSource, Manifest, Path]) -> None:
    """text_encoder.onnx on the bundle's tokenizers vs the pipeline's encode_prompt (float32 and float64), at a batch
    other than the traced one, with an empty, a unicode and a truncated prompt."""
    source, _, out = exported
    _check_encode_prompt(source, out, PROMPTS)


def _check_encode_prompt(source: ExportSource, out: Path, prompts: list[str]) -> None:
    pe, pooled = Bundle(out).encode_flow(prompts)
    pe32, pooled32 = _pipeline_embeddings(source.pipe, prompts)
    pe64, pooled64 = _float64_embeddings(source.pipe, prompts)
    assert pe.shape == pe32.shape and pooled.shape == pooled32.shape
    for name, got, f32, f64 in (("prompt_embeds", pe, pe32, pe64), ("pooled", pooled, pooled32, pooled64)):
        bound = network_bound(f64)
        err, err32 = float(np.abs(got - f64).max()), float(np.abs(f32 - f64).max())
        print(f"{source.family} {name}: |onnx - f64| {err:.3g}, |torch f32 - f64| {err32:.3g}, bound {bound:.3g}")
        assert err <= bound and err32 <= bound
        assert float(np.abs(got - f32).max()) <= 2 * bound


# Special tokens in a prompt: T5's "</s>" and a sentinel, and CLIP-G's "!" (SD3's pad token, a special token there).
SPECIAL_PROMPT = "a cat</s> on a mat <extra_id_3>, wow! <extra_id_100>"


@pytest.fixture(scope="module")
def sd3_t5(tmp_path_factory: pytest.TempPathFactory) -> tuple[ExportSource, Manifest, Path]:
    """A bundle of the tiny SD3 with its T5 encoder (``t5=True``): three tokenizers, ``input_ids_3``."""
    work = tmp_path_factory.mktemp("bundle-sd3-t5")
    noise = torch.randn((3, 16, HW // 2, HW // 2), generator=torch.Generator().manual_seed(0))
    bank = NegativeBank.from_tensor(noise).save(work / "bank.safetensors")
    source = dataclasses.replace(load_source(_args("sd3", bank)), pipe=tiny_sd3_pipeline(t5=True))
    return source, export_bundle(source, work / "bundle"), work / "bundle"


def test_sd3_with_t5_text_encoder_is_encode_prompt(sd3_t5: tuple[ExportSource, Manifest, Path]) -> None:
    """SD3 with T5: the third tokenizer and ``input_ids_3`` in the manifest, the graph equal to encode_prompt (also
    on a prompt with special tokens), and the bundle's ids of that prompt equal to the pipeline tokenizers' (the
    sentinel and "</s>" as T5's tokens, "!" as CLIP-G's pad token)."""
    source, manifest, out = sd3_t5
    assert [(s.folder, s.kind, s.input, s.max_length) for s in manifest.tokenizers][2] == (
        "tokenizer_3",
        "t5",
        "input_ids_3",
        256,
    )
    assert manifest.graphs["text_encoder"].input_names == ["input_ids", "input_ids_2", "input_ids_3"]
    _check_special_ids(source.pipe, manifest)
    _check_encode_prompt(source, out, [*PROMPTS, SPECIAL_PROMPT])
    ids = tokenize_flow(Bundle(out), [SPECIAL_PROMPT])
    for spec in manifest.tokenizers:
        tok = getattr(source.pipe, spec.folder)
        want = tok([SPECIAL_PROMPT], padding="max_length", max_length=spec.max_length, truncation=True).input_ids
        np.testing.assert_array_equal(ids[spec.input], np.asarray(want, np.int64), err_msg=spec.folder)
    t5 = source.pipe.tokenizer_3
    row = list(ids["input_ids_3"][0])
    assert t5.convert_tokens_to_ids("<extra_id_3>") in row and row.count(spec.eos_id) == 2  # "</s>", then the EOS
    clip_g, row_g = manifest.tokenizers[1], list(ids["input_ids_2"][0])
    assert clip_g.pad_id in row_g[: row_g.index(clip_g.eos_id)]  # the text's "!" is the pad token, as in SD3


def _philox(shape: tuple[int, ...], b: int) -> np.ndarray:
    n = int(np.prod(shape))
    return np.stack([gaussian_noise(SEED, i, INITIAL_STREAM, n).reshape(shape) for i in range(b)])


def _pipeline_loop(pipe: Any, noise: np.ndarray, negatives: list[str] | None, **kw: Any) -> np.ndarray:
    flux = "Flux" in type(pipe).__name__
    neg = {} if flux or negatives is None else {"negative_prompt": negatives}
    text = {} if "prompt_embeds" in kw else {"prompt": PROMPTS}
    out = pipe(
        num_inference_steps=STEPS,
        height=HW,
        width=HW,
        guidance_scale=SCALE["flux" if flux else "sd3"],
        latents=torch.from_numpy(noise),
        output_type="latent",
        **text,
        **neg,
        **kw,
    )
    return out.images.numpy()


def _moved_embeddings(pipe: Any, negatives: list[str] | None) -> dict[str, torch.Tensor]:
    """encode_prompt's outputs moved by +-network_bound (seeded signs): the text encoders' float32 error."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        if "Flux" in type(pipe).__name__:
            pe, pooled, _ = pipe.encode_prompt(PROMPTS, None)
            values = {"prompt_embeds": pe, "pooled_prompt_embeds": pooled}
        else:
            pe, npe, pooled, npooled = pipe.encode_prompt(PROMPTS, None, None, negative_prompt=negatives)
            values = {
                "prompt_embeds": pe,
                "pooled_prompt_embeds": pooled,
                "negative_prompt_embeds": npe,
                "negative_pooled_prompt_embeds": npooled,
            }
    return {k: v + network_bound(v) * (torch.randint(0, 2, v.shape, generator=gen) * 2 - 1) for k, v in values.items()}


@pytest.mark.parametrize("negatives", [None, NEGATIVES], ids=["no-negative", "negative"])
def test_prompt_to_sample_matches_pipeline(
    exported: tuple[ExportSource, Manifest, Path], negatives: list[str] | None
) -> None:
    """Bundle.sample_flow(prompts, seed) vs the pipeline with ``attach`` on the same Philox noise: within twice the
    loop's rounding sensitivity (module docstring), the correction firing at the same steps."""
    source, manifest, out = exported
    if source.family == "flux" and negatives is not None:  # no CFG: a negative prompt is refused, not ignored
        with pytest.raises(ValueError, match="negative"):
            Bundle(out).sample_flow(prompts=PROMPTS, negative_prompts=negatives, seed=SEED, steps=STEPS)
        return
    pipe, b = source.pipe, len(PROMPTS)
    noise = _philox(manifest.sample_shape, b)
    assert source.bank is not None and source.guidance is not None
    handle = attach(pipe, source.bank, source.guidance, record=True, reference=source.reference_bank)
    try:
        want = _pipeline_loop(pipe, noise, negatives)
        applied_pt = np.stack([r.record.applied.numpy() for r in handle.records])
        with perturbed(pipe.transformer):
            r_net = rel_err(_pipeline_loop(pipe, noise, negatives), want)
        r_text = rel_err(_pipeline_loop(pipe, noise, None, **_moved_embeddings(pipe, negatives)), want)
    finally:
        detach(pipe)
    got = Bundle(out).sample_flow(prompts=PROMPTS, negative_prompts=negatives, seed=SEED, steps=STEPS)
    err, bound = rel_err(got.sample, want), 2 * (r_net + r_text)
    preset = source.guidance.preset
    print(
        f"{source.family} {preset} {negatives is not None}: rel err {err:.3g}, bound {bound:.3g} (net {r_net:.3g},"
        f" text {r_text:.3g})"
    )
    # r_net is rounding-sized (1e-5 relative); the odds beta can amplify it (1.8e-3 measured for Flux, seed 3)
    assert 0 < r_net < 1e-2 and err <= bound
    assert got.applied is not None and np.array_equal(got.applied, applied_pt) and applied_pt.any()
    assert np.array_equal(run_bundle(out, PROMPTS, steps=STEPS, seed=SEED, negative_prompts=negatives), got.sample)


def _pipeline_decode(pipe: Any, latents: np.ndarray) -> np.ndarray:
    """The pipelines' decode of a final sample (Flux: unpack first), in float64."""
    x = torch.from_numpy(latents).double()
    if "Flux" in type(pipe).__name__:
        x = pipe._unpack_latents(x, HW, HW, pipe.vae_scale_factor)
    vae = copy.deepcopy(pipe.vae).double()
    with torch.no_grad():
        return vae.decode(x / vae.config.scaling_factor + vae.config.shift_factor, return_dict=False)[0].numpy()


def test_decoded_images(exported: tuple[ExportSource, Manifest, Path]) -> None:
    """vae_decoder.onnx on the final sample as sampled vs the pipeline's decode in float64 (within network_bound),
    and the uint8 pixels vs the pipeline's image processor on that float64 image (within one level)."""
    source, _, out = exported
    bundle = Bundle(out)
    sample = bundle.sample_flow(prompts=PROMPTS[:2], seed=SEED).sample
    image = bundle.decode(sample)
    want = _pipeline_decode(source.pipe, sample)
    err, bound = float(np.abs(image - want).max()), network_bound(want)
    print(f"{source.family} image: |onnx - f64| {err:.3g}, bound {bound:.3g}")
    assert image.shape == (2, 3, HW, HW) and err <= bound
    pixels = Bundle.to_uint8(image)
    processed = source.pipe.image_processor.postprocess(torch.from_numpy(want), output_type="np")  # NHWC in [0, 1]
    ref = np.round(processed * 255)  # as its numpy_to_pil
    assert pixels.dtype == np.uint8 and np.abs(pixels.astype(np.int64) - ref).max() <= 1


def test_external_data_round_trip(family: str, banks: tuple[Path, Path], tmp_path: Path) -> None:
    """With the threshold forced low every graph keeps its weights in one .data file next to it, hashed in
    ``files``; the bundle samples exactly as the inline one does, and a flipped byte in a .data file is refused."""
    source = load_source(_args(family, banks[0]))
    options = ExportOptions(verify=False, max_sequence_length=32)  # export --max-sequence-length: T5's tokens
    inline = export_bundle(source, tmp_path / "inline", options)
    manifest = export_bundle(source, tmp_path / "ext", dataclasses.replace(options, external_data_threshold=1024))
    for name, graph in manifest.graphs.items():
        assert graph.external_data == graph.file + ".data", name
        assert graph.external_data in manifest.files and inline.graphs[name].external_data is None
    got = Bundle(tmp_path / "ext").sample_flow(prompts=PROMPTS[:2], seed=SEED)
    want = Bundle(tmp_path / "inline").sample_flow(prompts=PROMPTS[:2], seed=SEED)
    np.testing.assert_array_equal(got.sample, want.sample)
    pe, _ = Bundle(tmp_path / "ext").encode_flow(PROMPTS)
    pe64, _ = _float64_embeddings(source.pipe, PROMPTS, max_sequence_length=32)
    assert pe.shape == pe64.shape and float(np.abs(pe - pe64).max()) <= network_bound(pe64)
    data = tmp_path / "ext" / "text_encoder.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 1
    data.write_bytes(bytes(raw))
    with pytest.raises(ManifestError, match=r"file 'text_encoder\.onnx\.data' does not match the manifest"):
        Bundle(tmp_path / "ext")


def test_refusals(exported: tuple[ExportSource, Manifest, Path], tmp_path: Path) -> None:
    """A missing tokenizer file, prompts with embeddings, Flux negatives, and a pre-text-encoder bundle."""
    source, manifest, out = exported
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    spec = manifest.tokenizers[1]
    (broken / spec.folder / spec.required_file).unlink()
    missing = rf"tokenizer folder 'tokenizer_2' \({spec.kind}\) has no '{spec.required_file}'"
    for check_files in (False, True):
        with pytest.raises(ManifestError, match=missing):
            Manifest.load(broken, check_files=check_files)
    bundle = Bundle(out)
    pe, pooled = bundle.encode_flow(PROMPTS[:1])
    with pytest.raises(ValueError, match="not both"):
        bundle.sample_flow(pe, pooled, prompts=PROMPTS[:1])
    if source.family == "flux":
        with pytest.raises(ValueError, match="takes none"):
            bundle.sample_flow(prompts=PROMPTS[:1], negative_prompts=["x"])
    else:
        with pytest.raises(ValueError, match="1 for 2 prompts"):
            bundle.sample_flow(prompts=PROMPTS[:2], negative_prompts=["x"])
    for steps in (0, 1001, 2.0):  # as the C++ runtime: 1..num_train_timesteps
        with pytest.raises(ValueError, match=r"steps must be an int in 1\.\.1000"):
            bundle.sample_flow(prompts=PROMPTS[:1], steps=steps)
    _refuse_special_ids(out, tmp_path)
    old = tmp_path / "old"  # as exported before flow text encoders: no tokenizers, no text_encoder / vae_decoder
    shutil.copytree(out, old)
    data = json.loads((old / "manifest.json").read_text())
    del data["tokenizers"]
    for name in ("text_encoder", "vae_decoder"):
        del data["graphs"][name]
    data["files"] = {k: v for k, v in data["files"].items() if k.startswith("denoiser")}
    (old / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="has no tokenizers"):
        Bundle(old).sample_flow(prompts=PROMPTS[:1])
    with pytest.raises(ManifestError, match="has no 'vae_decoder' graph"):
        Bundle(old).decode(np.zeros((1, *manifest.sample_shape), np.float32))
    embeddings = {"prompt_embeds": pe, "pooled_prompt_embeds": pooled}
    if source.family == "sd3":
        npe, npooled = bundle.encode_flow([""])
        embeddings.update(negative_prompt_embeds=npe, negative_pooled_prompt_embeds=npooled)
    old_sample = Bundle(old).sample_flow(**embeddings, seed=SEED).sample
    np.testing.assert_array_equal(old_sample, bundle.sample_flow(prompts=PROMPTS[:1], seed=SEED).sample)


def _refuse_special_ids(out: Path, tmp_path: Path) -> None:
    """A tokenizers entry without its special ids (exported before they were recorded) is refused saying to
    re-export; a recorded id the folder's tokenizer does not have is refused naming the field when it loads."""
    data = json.loads((out / "manifest.json").read_text())
    for key, value, message in (
        ("pad_id", None, r"tokenizers entry 'tokenizer_2' has no \['pad_id'\] .*re-export the bundle"),
        ("eos_id", 7, r"tokenizers entry 'tokenizer_2': eos_id is 7, but the tokenizer in 'tokenizer_2' has \d+"),
    ):
        changed = tmp_path / f"changed-{key}"
        shutil.copytree(out, changed)
        entry = dict(data["tokenizers"][1])
        if value is None:
            del entry[key]
        else:
            entry[key] = value
        (changed / "manifest.json").write_text(json.dumps({**data, "tokenizers": [data["tokenizers"][0], entry]}))
        with pytest.raises(ValueError, match=message):
            Bundle(changed).encode_flow(PROMPTS[:1])


def test_t5_tokenizer_without_spiece_is_refused(tmp_path: Path) -> None:
    from transformers import T5Tokenizer

    tok = T5Tokenizer(vocab=[("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581a", -1.0)])
    spec = TokenizerSpec("tokenizer_2", "t5", "input_ids_2", 512, pad_id=0, eos_id=1, extra_ids=100)
    with pytest.raises(ValueError, match=r"pipeline\.tokenizer_2 \(T5Tokenizer, kind 't5'\) saved no 'spiece\.model'"):
        save_tokenizer(FlowTokenizer(tok, spec, True), tmp_path)
    with pytest.raises(TokenizerSpecError, match=r"has no 'spiece\.model'"):
        spec.check_folder(tmp_path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"folder": "../x"}, "relative path inside the bundle"),
        ({"folder": "/abs"}, "relative path inside the bundle"),
        ({"kind": "bpe"}, "kind must be one of"),
        ({"max_length": 1.5}, "max_length must be an int"),
        ({"padding": "longest"}, "padding must be 'max_length'"),
        ({"pad_id": -1}, r"pad_id must be an int in 0\.\.2147483647"),
        ({"bos_id": True}, r"bos_id must be an int"),
        ({"extra_ids": 3}, "a clip tokenizer has no extra_ids"),
        ({"kind": "t5", "extra_ids": 5}, "a t5 tokenizer has no bos_id"),
    ],
)
def test_tokenizer_spec_checks(change: dict[str, Any], message: str) -> None:
    good = TokenizerSpec("tokenizer", "clip", "input_ids", 77, pad_id=513, eos_id=513, bos_id=512)
    assert TokenizerSpec.from_dict(good.to_dict()) == good
    with pytest.raises(TokenizerSpecError, match=message):
        TokenizerSpec.from_dict({**good.to_dict(), **change})

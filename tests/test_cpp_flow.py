"""Flow bundles (SD3, Flux) in the C++ runtime (cpp_runtime/src/flow_runtime.cpp, flow_sampler.cpp) against the
Python runtime (``Bundle.sample_flow`` + ``decode``; docs/bundle_format.md, "What a runtime does with a flow bundle").

Schedule: ``safe-denoiser-cpp schedule --flow`` equals ``runtime.flow_sampler.flow_schedule`` bit for bit over many
step counts, both families, static shift and dynamic shifting (exponential and linear, mu given or from
``calculate_shift``). End to end on the tiny SD3 (odds preset, with and without a negative prompt; its CLIP-G pads
with "!" as SD3's does), the tiny SD3 with its T5 encoder (``input_ids_3``) and Flux (constant preset, T5
tokenizer, packed samples) bundles of cpp_runtime/scripts/make_test_bundles.py (SD3 + T5: exported here): the same
PNG bytes, also for a prompt with special tokens ("</s>", "<extra_id_3>", "!"), and final samples within the
float32 rounding bound below; the server's OpenAI and AUTOMATIC1111 routes give the PNG of ``generate`` with the
FlowMatch Euler sampler and refuse DDIM / DDPM naming the field; ``info`` lists the tokenizers and their special
ids; Flux refuses a negative prompt, and bundles without a text encoder or without recorded special ids, or whose
recorded ids the tokenizer folder contradicts, are refused naming what to do.

Sample bound: both runtimes feed the same graphs to the same ONNX Runtime library and step in float32 in the same
order, so the samples are equal in practice; the test allows one float32 rounding of the largest value per step
(steps x 2^-24 x max|x|, relative to max|x|), what a single kernel rounding differently would move.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_cpp_runtime import EXIT, Server, cpp, run

from safe_denoiser.runtime.bundle import Bundle
from safe_denoiser.runtime.flow_sampler import calculate_shift, flow_schedule
from safe_denoiser.runtime.png import png_bytes

from helpers import bundle_script

__all__ = ["cpp"]  # the fixture shared with test_cpp_runtime
FLOW_BUNDLES = ("tiny_sd3", "tiny_flux")
PROMPTS = ["a photo of a cat", "", "ünïcödé 3.14 " + "a very long prompt that is truncated " * 40]
SPECIAL_PROMPT = "a cat</s> on a mat <extra_id_3>, wow!"  # T5's </s> and a sentinel, CLIP-G's pad token "!"
U32 = 2.0**-24


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The two flow test bundles, exported with make_test_bundles.py's specs and banks."""
    script = bundle_script()
    from safe_denoiser.export.exporter import export_bundle, load_source
    from safe_denoiser.testing import tiny_sd3_pipeline

    out = tmp_path_factory.mktemp("flow_bundles")
    for bank, (family, prompts, seeds) in script.FLOW_BANKS.items():
        script.flow_bank(out / bank, family, prompts, seeds)
    for name in FLOW_BUNDLES:
        export_bundle(load_source(script.specs(out)[name]), out / name)
    sd3 = load_source(script.specs(out)["tiny_sd3"])  # the same with T5: tokenizer_3, input_ids_3
    export_bundle(dataclasses.replace(sd3, pipe=tiny_sd3_pipeline(t5=True)), out / "tiny_sd3_t5")
    return out


# ---- the schedule -------------------------------------------------------------------------------------------------
BASE = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": False,
    "time_shift_type": "exponential",
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
    "sigma_min": 0.002994012087583542,
    "sigma_max": 1.0,
    "pipeline_sigmas": None,
}
FLUX = {**BASE, "family": "flux", "sigma_min": 0.0010000000474974513, "pipeline_sigmas": "linspace"}
SCHEDULES: dict[str, dict[str, Any]] = {
    "sd3": {**BASE, "family": "sd3"},
    "sd3-shift1": {**BASE, "family": "sd3", "shift": 1.0},
    "sd3-odd-shift": {**BASE, "family": "sd3", "shift": 2.7, "sigma_min": 0.001},
    "sd3-dynamic": {**BASE, "family": "sd3", "use_dynamic_shifting": True, "image_seq_len": 4096, "mu": 1.15},
    "flux": {**FLUX, "use_dynamic_shifting": True, "image_seq_len": 16, "mu": calculate_shift(16, FLUX)},
    "flux-1024": {**FLUX, "use_dynamic_shifting": True, "image_seq_len": 1024},  # mu from calculate_shift
    "flux-linear": {**FLUX, "use_dynamic_shifting": True, "time_shift_type": "linear", "mu": 0.7},
    "flux-static": {**FLUX, "shift": 1.7},
}
STEPS = [1, 2, 3, 4, 5, 7, 10, 13, 20, 28, 33, 50, 64, 100, 257, 1000]


@pytest.mark.parametrize("case", sorted(SCHEDULES))
def test_flow_schedule_is_pythons_bit_for_bit(cpp: Path, tmp_path: Path, case: str) -> None:
    flow = SCHEDULES[case]
    path = tmp_path / "flow.json"
    path.write_text(json.dumps(flow))
    for steps in STEPS:
        got = json.loads(run(cpp, "schedule", "--flow", str(path), "--steps", str(steps)).stdout)
        timesteps, sigmas = flow_schedule(flow, steps)
        assert np.array_equal(np.asarray(got["timesteps"], np.float32), timesteps), (case, steps)
        assert np.array_equal(np.asarray(got["sigmas"], np.float32), sigmas), (case, steps)
        # the JSON holds float32 values exactly (a double that is a float32 prints as its shortest round trip)
        assert np.array_equal(np.asarray(got["sigmas"], np.float64), sigmas.astype(np.float64)), (case, steps)


def test_flow_schedule_refuses_bad_sections(cpp: Path, tmp_path: Path) -> None:
    path = tmp_path / "flow.json"
    for change, needle in (
        ({"family": "sdxl"}, "flow.family must be 'sd3' or 'flux'"),
        ({"shift": 0}, "flow.shift must be > 0"),
        ({"num_train_timesteps": 1e30}, "flow.num_train_timesteps must be an integer"),
        ({"time_shift_type": "cubic"}, "flow.time_shift_type must be 'exponential' or 'linear'"),
        ({"use_dynamic_shifting": True}, "flow.mu must be a number, or image_seq_len given"),
    ):
        path.write_text(json.dumps({**SCHEDULES["sd3"], **change}))
        proc = run(cpp, "schedule", "--flow", str(path), "--steps", "4", check=False)
        assert proc.returncode == EXIT["bundle"] and needle in proc.stderr, (change, proc.stderr)


# ---- end to end -----------------------------------------------------------------------------------------------------
def python_image(bundle: Bundle, prompt: str, negative: str | None, seed: int, item: int) -> tuple[np.ndarray, bytes]:
    """The Python runtime's final sample and PNG bytes of image ``item`` under ``seed`` (a batch of item + 1)."""
    negatives = None if negative is None else [negative] * (item + 1)
    result = bundle.sample_flow(prompts=[prompt] * (item + 1), negative_prompts=negatives, seed=seed)
    return result.sample[item], png_bytes(Bundle.to_uint8(bundle.decode(result.sample))[item])


def cpp_image(cpp: Path, bundle: Path, tmp: Path, prompt: str, negative: str | None, seed: int, item: int = 0) -> Any:
    out = tmp / f"{bundle.name}-{seed}-{item}.png"
    neg = [] if negative is None else ["--negative-prompt", negative]
    args = ["--prompt", prompt, *neg, "--seed", str(seed), "--item", str(item)]
    sample_out = str(out.with_suffix(".npy"))
    run(cpp, "generate", "--bundle", str(bundle), *args, "--out", str(out), "--sample-out", sample_out)
    record = json.loads(out.with_suffix(".json").read_text())
    return np.load(out.with_suffix(".npy"))[0], out.read_bytes(), record


@pytest.mark.parametrize(
    ("name", "negative"),
    [("tiny_sd3", None), ("tiny_sd3", "blurry, low quality"), ("tiny_sd3_t5", "blurry</s>"), ("tiny_flux", None)],
    ids=["sd3", "sd3-negative", "sd3-t5", "flux"],
)
def test_generate_equals_the_python_runtime(cpp: Path, bundles: Path, tmp_path: Path, name: str, negative: Any) -> None:
    bundle = Bundle(bundles / name)
    steps = bundle.manifest.num_inference_steps
    cases = ((PROMPTS[0], 7, 0), (PROMPTS[1], 0, 1), (PROMPTS[2], 12345, 0), (SPECIAL_PROMPT, 3, 0))
    for prompt, seed, item in cases:
        want_sample, want_png = python_image(bundle, prompt, negative, seed, item)
        sample, png, record = cpp_image(cpp, bundles / name, tmp_path, prompt, negative, seed, item)
        scale = float(np.abs(want_sample).max())
        err = float(np.abs(sample - want_sample).max())
        print(f"{name} negative={negative!r} seed {seed}: max |C++ - Python| {err:.3g} (scale {scale:.3g})")
        assert sample.shape == tuple(bundle.manifest.sample_shape) and err <= steps * U32 * scale
        assert png == want_png, (name, prompt, seed)
        timesteps, _ = flow_schedule(bundle.manifest.flow or {}, steps)
        assert record["timesteps"] == timesteps.tolist() and record["sampler"] == "flow_euler"
        assert record["correction"] == {"tiny_sd3": "odds", "tiny_sd3_t5": "odds", "tiny_flux": "constant"}[name]
        assert len(record["kernel_log_mass"]) == steps and set(record["corrected_steps"]) <= set(record["timesteps"])


def test_openai_route_gives_the_bytes_of_generate(cpp: Path, bundles: Path, tmp_path: Path) -> None:
    for name, negative in (("tiny_sd3", "blurry"), ("tiny_flux", None)):
        server = Server(cpp, bundles / name, "--max-batch", "2")
        try:
            body: dict[str, Any] = {"prompt": "a red cat", "n": 2, "seed": 11, "size": "16x16"}
            if negative is not None:
                body["negative_prompt"] = negative
            status, answer = server.request("POST", "/v1/images/generations", json.dumps(body).encode())
            assert status == 200, answer
            data = json.loads(answer)["data"]
            for item, image in enumerate(data):  # image i of n is (seed, item i), batched together by the server
                _, want, _ = cpp_image(cpp, bundles / name, tmp_path, "a red cat", negative, 11, item)
                assert base64.b64decode(image["b64_json"]) == want, (name, item)
            if negative is None:  # Flux: a negative prompt is a 400 naming it
                body["negative_prompt"] = "blurry"
                status, answer = server.request("POST", "/v1/images/generations", json.dumps(body).encode())
                assert status == 400 and b"negative_prompt" in answer, answer
        finally:
            server.stop()


def test_info_lists_what_a_flow_bundle_needs(cpp: Path, bundles: Path) -> None:
    for name, kinds in (
        ("tiny_sd3", [("clip", 77), ("clip", 77)]),
        ("tiny_sd3_t5", [("clip", 77), ("clip", 77), ("t5", 256)]),
        ("tiny_flux", [("clip", 77), ("t5", 512)]),
    ):
        info = json.loads(run(cpp, "info", "--bundle", str(bundles / name)).stdout)
        assert info["path"] == "flow" and info["flow"]["family"] == name.split("_")[1]
        assert sorted(info["graphs"]) == ["denoiser", "text_encoder", "vae_decoder"]
        assert [(t["kind"], t["max_length"]) for t in info["tokenizers"]] == kinds
        specs = Bundle(bundles / name).manifest.tokenizers
        assert [t["input"] for t in info["tokenizers"]] == [s.input for s in specs]
        ids = [{k: t[k] for k in t if k.endswith("_id") or k == "extra_ids"} for t in info["tokenizers"]]
        assert ids == [s.special_ids for s in specs]


def test_flow_refusals(cpp: Path, bundles: Path, tmp_path: Path) -> None:
    out = tmp_path / "x.png"
    flux = ["generate", "--bundle", str(bundles / "tiny_flux"), "--prompt", "a cat", "--seed", "1", "--out", str(out)]
    proc = run(cpp, *flux, "--negative-prompt", "blurry", check=False)
    assert proc.returncode == EXIT["input"] and "negative_prompt: this flux bundle takes none" in proc.stderr
    proc = run(cpp, *flux, "--sampler", "ddpm", check=False)
    assert proc.returncode == EXIT["input"] and "flow-matching Euler sampler" in proc.stderr
    assert not out.exists()
    # a flow bundle exported before its text encoder (it takes embeddings): refused, saying to re-export
    old = tmp_path / "old_sd3"
    shutil.copytree(bundles / "tiny_sd3", old)
    data = json.loads((old / "manifest.json").read_text())
    for graph in ("text_encoder", "vae_decoder"):
        del data["graphs"][graph]
        del data["files"][f"{graph}.onnx"]
    data["tokenizers"] = []
    data["files"] = {k: v for k, v in data["files"].items() if not k.startswith("tokenizer")}
    (old / "manifest.json").write_text(json.dumps(data))
    proc = run(cpp, "info", "--bundle", str(old), check=False)
    assert proc.returncode == EXIT["bundle"], proc.stderr
    assert "no graph 'text_encoder', graph 'vae_decoder', tokenizers" in proc.stderr and "re-export" in proc.stderr
    # a tokenizer folder without its kind's file
    broken = tmp_path / "no_spiece"
    shutil.copytree(bundles / "tiny_flux", broken)
    (broken / "tokenizer_2" / "spiece.model").unlink()
    proc = run(cpp, "info", "--bundle", str(broken), "--no-verify-files", check=False)
    assert proc.returncode == EXIT["bundle"] and "'tokenizer_2' (t5) has no 'spiece.model'" in proc.stderr


def test_sampler_is_explicit_on_flow_bundles(cpp: Path, bundles: Path, tmp_path: Path) -> None:
    """A flow bundle samples with flow_euler: no sampler, "flow_euler" or "euler" give the Python runtime's PNG (the
    bytes of before the sampler was explicit); "ddim" / "ddpm" (the CLI, a batch line, /generate) are input errors
    naming the field and flow_euler, writing nothing."""
    bundle = bundles / "tiny_flux"
    _, want = python_image(Bundle(bundle), "a red cat", None, 5, 0)
    args = ["generate", "--bundle", str(bundle), "--prompt", "a red cat", "--seed", "5"]
    for i, sampler in enumerate(([], ["--sampler", "flow_euler"], ["--sampler", "euler"])):
        out = tmp_path / f"ok{i}.png"
        run(cpp, *args, *sampler, "--out", str(out))
        assert out.read_bytes() == want, sampler
        assert json.loads(out.with_suffix(".json").read_text())["sampler"] == "flow_euler"
    for name in ("ddim", "ddpm"):
        out = tmp_path / f"{name}.png"
        proc = run(cpp, *args, "--sampler", name, "--out", str(out), check=False)
        assert proc.returncode == EXIT["input"], proc.stderr
        assert "--sampler: this flow bundle (SD3, Flux)" in proc.stderr and f"got {name}" in proc.stderr
        assert "expected flow_euler (or euler)" in proc.stderr and not out.exists()
    requests = tmp_path / "requests.jsonl"
    requests.write_text(json.dumps({"id": "a", "prompt": "a red cat", "seed": 5, "sampler": "ddim"}) + "\n")
    (tmp_path / "batch").mkdir()
    proc = run(
        cpp,
        "batch",
        "--bundle",
        str(bundle),
        "--requests",
        str(requests),
        "--out-dir",
        str(tmp_path / "batch"),
        check=False,
    )
    assert proc.returncode == EXIT["input"] and "line 1: sampler: this flow bundle" in proc.stderr, proc.stderr
    assert not list((tmp_path / "batch").iterdir())
    server = Server(cpp, bundle)
    try:
        for extra in ({}, {"sampler": "flow_euler"}, {"sampler": "euler"}):
            status, png = server.generate({"prompt": "a red cat", "seed": 5, **extra})
            assert status == 200 and png == want, (extra, status)
        for name in ("ddim", "ddpm"):
            status, answer = server.generate({"prompt": "a red cat", "seed": 5, "sampler": name})
            assert status == 400 and b"sampler: this flow bundle (SD3, Flux)" in answer, answer
            assert b"expected flow_euler (or euler), got " + name.encode() in answer, answer
    finally:
        server.stop()


def test_special_ids_are_recorded_and_checked(cpp: Path, bundles: Path, tmp_path: Path) -> None:
    """A tokenizers entry without its special ids is refused saying to re-export (no fallback: tokenizer.json does
    not say SD3's CLIP-G pad "!"); recorded ids the folder contradicts are refused naming the field (exit 3)."""
    data = json.loads((bundles / "tiny_sd3" / "manifest.json").read_text())
    clip_g = data["tokenizers"][1]
    for change, needle in (
        ({"pad_id": None}, "manifest: tokenizers[1] has no pad_id (exported before special token ids were recorded)"),
        ({"bos_id": None}, "manifest: tokenizers[1] has no bos_id"),
        ({"pad_id": 100000}, "the manifest's pad_id 100000 is not an id of tokenizer.json"),
        ({"bos_id": clip_g["eos_id"]}, f"the manifest's bos_id {clip_g['eos_id']} is not tokenizer.json's"),
        ({"extra_ids": 3}, "tokenizers[1].extra_ids must be absent for a clip tokenizer"),
        ({"pad_id": 1.5}, "tokenizers[1].pad_id must be an integer in 0..2147483647"),
    ):
        changed = tmp_path / f"changed-{len(list(tmp_path.iterdir()))}"
        shutil.copytree(bundles / "tiny_sd3", changed)
        entry = {k: v for k, v in {**clip_g, **change}.items() if v is not None}
        (changed / "manifest.json").write_text(json.dumps({**data, "tokenizers": [data["tokenizers"][0], entry]}))
        proc = run(cpp, "info", "--bundle", str(changed), check=False)
        assert proc.returncode == EXIT["bundle"] and needle in proc.stderr, (change, proc.stderr)
        if None in change.values():
            assert "re-export the bundle" in proc.stderr
    data = json.loads((bundles / "tiny_flux" / "manifest.json").read_text())
    t5 = {**data["tokenizers"][1], "eos_id": 485}  # the tiny T5's ids: 385 pieces + 100 sentinels
    changed = tmp_path / "t5"
    shutil.copytree(bundles / "tiny_flux", changed)
    (changed / "manifest.json").write_text(json.dumps({**data, "tokenizers": [data["tokenizers"][0], t5]}))
    proc = run(cpp, "info", "--bundle", str(changed), check=False)
    assert proc.returncode == EXIT["bundle"], proc.stderr
    assert "the manifest's eos_id 485 is not an id of the model (0..484)" in proc.stderr


def test_server_routes_sample_flow_bundles_with_euler(cpp: Path, bundles: Path, tmp_path: Path) -> None:
    """AUTOMATIC1111: sampler_name "Euler" (or none) is the FlowMatch Euler sampler and gives the PNG of generate;
    DDIM / DDPM are a 400 naming sampler_name and "Euler". OpenAI: the extra field sampler "flow_euler" / "euler" is
    accepted, "ddim" refused naming sampler."""
    server = Server(cpp, bundles / "tiny_sd3")
    try:
        _, want, _ = cpp_image(cpp, bundles / "tiny_sd3", tmp_path, "a red cat", "blurry", 21)
        base = {"prompt": "a red cat", "negative_prompt": "blurry", "seed": 21, "width": 16, "height": 16}
        for extra in ({"sampler_name": "Euler", "eta": 1.0}, {}, {"sampler_index": "euler"}):
            status, answer = server.request("POST", "/sdapi/v1/txt2img", json.dumps({**base, **extra}).encode())
            assert status == 200, (extra, answer)
            body = json.loads(answer)
            assert base64.b64decode(body["images"][0]) == want, extra
            assert json.loads(body["info"])["sampler_name"] == "Euler"
        webuiapi = pytest.importorskip("webuiapi")
        steps = Bundle(bundles / "tiny_sd3").manifest.num_inference_steps  # webuiapi's default is 20
        api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port, sampler="Euler", steps=steps)  # eta 1.0: unused
        result = api.txt2img(prompt="a red cat", negative_prompt="blurry", seed=21, cfg_scale=5.0, width=16, height=16)
        assert base64.b64decode(result.json["images"][0]) == want and result.info["sampler_name"] == "Euler"
        for name in ("DDIM", "DDPM", "Euler a"):
            status, answer = server.request(
                "POST", "/sdapi/v1/txt2img", json.dumps({**base, "sampler_name": name}).encode()
            )
            assert (
                status == 400
                and b"sampler_name: this flow bundle (SD3, Flux) samples with the FlowMatch Euler" in answer
            )
            assert b'expected \\"Euler\\"' in answer, answer
        openai = {"prompt": "a red cat", "negative_prompt": "blurry", "seed": 21, "size": "16x16"}
        for sampler in ("flow_euler", "Euler"):
            status, answer = server.request(
                "POST", "/v1/images/generations", json.dumps({**openai, "sampler": sampler}).encode()
            )
            assert status == 200 and base64.b64decode(json.loads(answer)["data"][0]["b64_json"]) == want, answer
        for sampler in ("ddim", "ddpm", 3):
            status, answer = server.request(
                "POST", "/v1/images/generations", json.dumps({**openai, "sampler": sampler}).encode()
            )
            assert status == 400 and json.loads(answer)["error"]["param"] == "sampler", answer
            assert b'expected \\"flow_euler\\"' in answer, answer
    finally:
        server.stop()

"""Write the fuzzers' seed corpora and fixtures (cpp_runtime/fuzz/corpus/, data/) from the test bundles.

Manifests are shrunk (a 20-step training schedule, compact JSON) so that libFuzzer mutates small inputs; the ONNX
seeds are hand-encoded ModelProto files covering every storage form the initializer reader handles. Run once and
commit the output; the fuzz runs never need the bundles.

Usage: python cpp_runtime/fuzz/make_corpus.py BUNDLES   (BUNDLES: scripts/make_test_bundles.py's output folder)
"""

from __future__ import annotations

import json
import shutil
import struct
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TRAIN_STEPS = 20  # training timesteps kept in the shrunk manifests


def shrink(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest with a TRAIN_STEPS-timestep training schedule, its tables rebuilt from the scheduler config (VP)
    or the flow section (flow) as the manifest contract requires, so the fuzzer starts from manifests the contract
    accepts and mutates past it (a cut table would be refused at its first check)."""
    from safe_denoiser.runtime.contract import flow_train_sigmas, vp_alphas_cumprod

    sched, flow = manifest["scheduler"], manifest.get("flow")
    sched["config"]["num_train_timesteps"] = TRAIN_STEPS
    if flow is not None:
        flow["num_train_timesteps"] = TRAIN_STEPS
        sigmas = flow_train_sigmas(flow)
        flow["sigma_min"], flow["sigma_max"] = float(sigmas.min()), float(sigmas.max())
        abar = (1 - sigmas) ** 2 / ((1 - sigmas) ** 2 + sigmas**2)
    else:
        abar = vp_alphas_cumprod(sched["config"])[0]
        sigmas = ((1 - abar) / abar) ** 0.5
        if not sched["ddim"].get("set_alpha_to_one", True):
            sched["final_alpha_cumprod"] = float(abar[0])
    sched["alphas_cumprod"], sched["sigmas"] = abar.tolist(), sigmas.tolist()
    manifest["num_inference_steps"] = min(manifest["num_inference_steps"], TRAIN_STEPS // 2)
    for graph in manifest["graphs"].values():  # export-time measurements: nothing reads them
        graph["parity_max_abs_diff"], graph["parity_max_abs_value"] = {}, {}
    return manifest


def varint(v: int) -> bytes:
    out = bytearray()
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    return bytes(out + bytes([v]))


def field(num: int, payload: bytes | int) -> bytes:
    if isinstance(payload, int):
        return varint(num << 3) + varint(payload)
    return varint(num << 3 | 2) + varint(len(payload)) + payload


def model(*tensors: bytes) -> bytes:
    """ModelProto {ir_version 1, graph 7 {name 2, initializer 5...}}."""
    graph = field(2, b"g") + b"".join(field(5, t) for t in tensors)
    return field(1, 8) + field(7, graph)


def onnx_seeds() -> dict[str, bytes]:
    floats = struct.pack("<4f", 1.0, -2.0, 0.5, 3.25)
    halves = struct.pack("<4e", 1.0, -2.0, 0.5, 3.25)
    name = field(8, b"negative_bank")
    dims = field(1, 2) + field(1, 2)
    other = field(1, 1) + field(2, 1) + field(8, b"other") + field(9, struct.pack("<f", 9.0))
    loose = b"".join(varint(4 << 3 | 5) + floats[i : i + 4] for i in range(0, 16, 4))
    external = b"".join(
        field(13, field(1, k.encode()) + field(2, v.encode()))
        for k, v in (("location", "bank.bin"), ("offset", "0"), ("length", "16"))
    )
    return {
        "raw_float32.onnx": model(other, dims + field(2, 1) + name + field(9, floats)),
        "raw_float16.onnx": model(dims + field(2, 10) + name + field(9, halves)),
        "packed_float_data.onnx": model(dims + field(2, 1) + field(4, floats) + name),
        "loose_float_data.onnx": model(dims + field(2, 1) + loose + name),
        "external.onnx": model(dims + field(2, 1) + name + external + field(14, 1)),
        "not_float.onnx": model(dims + field(2, 7) + name + field(9, floats * 2)),
    }


REQUESTS: list[Any] = [
    {"class": 3, "seed": 7},
    {"class": 1, "negative_class": 0, "seed": 18446744073709551615, "item": 2, "steps": 4, "guidance": 2.5},
    {"prompt": "a photo of a cat", "negative_prompt": "blurry", "seed": 1, "sampler": "ddpm", "id": "cat-1"},
    {"prompt": "", "steps": 20, "sampler": "ddim", "guidance": 0},
    {"class": -1},
    {"unknown": 1},
    [1, 2, 3],
]

API_BODIES: list[dict[str, Any]] = [
    {"prompt": "a photo of a cat", "n": 2, "size": "64x64", "response_format": "b64_json", "seed": 3},
    {"prompt": "3", "negative_prompt": "0", "model": "x", "user": "u", "steps": 4, "guidance_scale": 2.0},
    {
        "prompt": "a dog",
        "negative_prompt": "blurry",
        "seed": -1,
        "steps": 4,
        "cfg_scale": 7,
        "batch_size": 2,
        "n_iter": 2,
        "width": 64,
        "height": 64,
        "sampler_name": "DDIM",
    },
    {"prompt": "1", "seed": 18446744073709551615, "batch_size": 1, "sampler_index": "Euler a"},
    {"prompt": "x", "size": "auto", "response_format": "url"},
]

PROMPTS = [
    "a photo of a cat",
    "<|startoftext|>An astronaut   riding a HORSE, 4k!<|endoftext|>",
    "caf\u00e9 na\u00efve \u6771\u4eac \U0001f600 don't we'll it's",
    "x" * 300,
]


def write(folder: Path, files: dict[str, bytes]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)


def main(bundles: Path) -> None:
    manifests = {p.parent.name: json.loads(p.read_text()) for p in sorted(bundles.glob("*/manifest.json"))}
    shrunk = {name: json.dumps(shrink(m), separators=(",", ":")).encode() for name, m in manifests.items()}
    write(HERE / "corpus/manifest", {f"{name}.json": data for name, data in shrunk.items()})
    write(HERE / "data", {"manifest_class.json": shrunk["demo_theorem"], "manifest_text.json": shrunk["tiny_sld"]})
    tokenizer = bundles / "tiny_sld/tokenizer"
    (HERE / "data/tokenizer").mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tokenizer / name, HERE / "data/tokenizer" / name)
    compact = json.dumps(json.loads((tokenizer / "tokenizer.json").read_text()), separators=(",", ":"))
    write(HERE / "corpus/tokenizer_json", {"tokenizer.json": compact.encode()})
    write(HERE / "corpus/onnx_initializer", onnx_seeds())
    write(HERE / "corpus/requests", {f"request_{i}.json": json.dumps(r).encode() for i, r in enumerate(REQUESTS)})
    write(HERE / "corpus/tokenizer", {f"prompt_{i}.txt": p.encode() for i, p in enumerate(PROMPTS)})
    write(HERE / "corpus/api_compat", {f"body_{i}.json": json.dumps(b).encode() for i, b in enumerate(API_BODIES)})


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(Path(sys.argv[1]))

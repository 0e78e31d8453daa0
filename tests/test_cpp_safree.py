"""SAFREE's text side in the C++ runtime (cpp_runtime/src/safree.cpp) against the Python runtime.

Text side: the hidden ``safe-denoiser-cpp safree`` subcommand against ``safe_denoiser.runtime.safree_text`` on the
same float32 inputs (random prompts with planted trigger tokens, n = 1, 2, 75 real tokens, rank-deficient and
all-zero masked sets, widths 32 and 768): trigger flags and t' equal, filtered rows within one float32 spacing plus
the float64 error of the span (both compute in float64 and round once: in practice the same bits). End to end: the
C++ runtime and ``Bundle.sample`` give the same PNG bytes, flags and t' on the SAFREE test bundles
(cpp_runtime/scripts/make_test_bundles.py: tiny_safree with self-validation and the correction, tiny_safree_always
without either), with and without negative prompts, one image and a batch of four. Bad ``safree`` sections: exit 3
naming the field.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_cpp_runtime import copy_bundle, cpp, edit_manifest, expect_failure, run

from safe_denoiser.runtime.bundle import Bundle
from safe_denoiser.runtime.png import png_bytes
from safe_denoiser.runtime.safree_text import SafreeSettings, safree_prompt

from helpers import bundle_script

__all__ = ["cpp"]  # the fixture shared with test_cpp_runtime
PROMPTS = ["a photo of a nude woman", "a red car", "naked body of a man on the beach", ""]
NEGATIVE = "a blurry photo"
SAFREE_BUNDLES = ("tiny_safree", "tiny_safree_always")
F32_EPS = float(np.finfo(np.float32).eps)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The two SAFREE test bundles, exported with make_test_bundles.py's specs."""
    script = bundle_script()
    import safe_denoiser.testing  # noqa: F401  (registers the "tiny-sd" model kind)
    from safe_denoiser.export.exporter import export_bundle, load_source

    out = tmp_path_factory.mktemp("safree_bundles")
    script.tiny_bank(out / "tiny_bank.safetensors")
    for name in SAFREE_BUNDLES:
        export_bundle(load_source(script.specs(out)[name]), out / name)
    return out


# ---- the text side on given inputs ------------------------------------------------------------------------------
def settings(rng: np.random.Generator, dim: int, rank: int) -> dict[str, Any]:
    basis, _ = np.linalg.qr(rng.standard_normal((dim, rank)))
    return {
        "alpha": float(rng.choice([0.0, 0.01, 0.2])),
        "self_validation": True,
        "svf_max_step": 10,
        "svf_sharpness": float(rng.choice([1.0, 50.0])),
        "svf_midpoint": float(rng.choice([0.0, 0.5333])),
        "mask_token_id": 0,
        "pooling": "eos",
        "eos_token_id": 2,
        "concept_basis": basis.astype(np.float32).tolist(),
    }


def random_case(rng: np.random.Generator, basis: np.ndarray, n: int, kind: str) -> dict[str, Any]:
    """A prompt (L = max(n + 2, 8) rows) and its n masked pooled rows: near the concept subspace except where masking
    removes a planted trigger (a larger residual); ``kind`` "deficient" repeats and combines rows (rank < n),
    "zero" makes them all zero (rank 0)."""
    dim, length = basis.shape[0], max(n + 2, 8)
    near = rng.standard_normal((n, basis.shape[1])) @ basis.T * 3
    residual = rng.standard_normal((n, dim)) / np.sqrt(dim)
    triggers = rng.random(n) < 0.3
    masked = near + residual * np.where(triggers, 1.6, 1.0)[:, None]
    if kind == "deficient" and n >= 3:
        masked[1::3] = masked[0]  # duplicates (a repeated word)
        masked[2::3] = 0.5 * masked[0] - 2.0 * masked[n - 1]  # combinations
    if kind == "zero":
        masked[:] = 0
    span = rng.standard_normal((length, n)) @ masked * rng.choice([0.0, 0.3, 1.0])
    tokens = span + rng.standard_normal((length, dim)) * rng.choice([0.1, 1.0])
    active = int(rng.integers(min(n + 2, length), length + 1))
    return {"tokens": tokens.astype(np.float32), "masked": masked.astype(np.float32), "active": active}


def cases(seed: int, dim: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    rng = np.random.default_rng(seed)
    cfg = settings(rng, dim, int(rng.choice([1, 3, 17])))
    basis = np.asarray(cfg["concept_basis"], dtype=np.float32)
    out = [random_case(rng, basis, n, kind) for n in (1, 2, 5, 75) for kind in ("plain", "deficient")]
    out.append(random_case(rng, basis, 4, "zero"))
    return cfg, out


def span_condition(masked: np.ndarray) -> float:
    """s_max / s_r of the masked rows' kept singular values (numpy's cut-off): how far float64 errors grow."""
    s = np.linalg.svd(masked.astype(np.float64), compute_uv=False)
    kept = s[s > s.max() * max(masked.shape) * F32_EPS] if s.size and s.max() > 0 else s[:0]
    return float(kept.max() / kept.min()) if kept.size else 1.0


def compare_text_side(cpp: Path, tmp_path: Path, seed: int, dim: int) -> float:
    """Run one seed's cases through both; the largest filtered-row difference in units of its bound."""
    cfg, inputs = cases(seed, dim)
    payload = {"settings": cfg, "cases": [{k: np.asarray(v).tolist() for k, v in c.items()} for c in inputs]}
    (tmp_path / "in.json").write_text(json.dumps(payload))
    run(cpp, "safree", "--input", str(tmp_path / "in.json"), "--out", str(tmp_path / "out.json"))
    got = json.loads((tmp_path / "out.json").read_text())
    settings = SafreeSettings.from_dict(cfg)
    worst = 0.0
    for c, g in zip(inputs, got, strict=True):
        active = np.arange(c["tokens"].shape[0]) < c["active"]
        want = safree_prompt(c["tokens"], c["masked"], active, settings)
        assert tuple(g["triggers"]) == want.triggers and g["last_step"] == want.last_step, (seed, c["active"])
        filtered = np.asarray(g["filtered"], dtype=np.float32)
        # One float32 spacing (the two float64 results round to neighbours) plus their float64 differences.
        norms = np.linalg.norm(c["tokens"].astype(np.float64), axis=1, keepdims=True)
        bound = np.spacing(np.abs(want.filtered)) + 1e-13 * span_condition(c["masked"]) * norms
        worst = max(worst, float((np.abs(filtered - want.filtered) / bound).max()))
    return worst


@pytest.mark.parametrize("dim", [32, 768])
def test_text_side_equals_numpy(cpp: Path, tmp_path: Path, dim: int) -> None:
    seeds = range(12) if dim == 32 else range(2)
    worst = max(compare_text_side(cpp, tmp_path, seed, dim) for seed in seeds)
    print(f"SAFREE text side, width {dim}: C++ vs numpy, worst difference {worst:.3g} of the bound")
    assert worst <= 1.0


# ---- end to end -------------------------------------------------------------------------------------------------
def generate(cpp: Path, bundle: Path, tmp_path: Path, prompt: str, negative: str | None) -> tuple[bytes, dict]:
    out = tmp_path / "x.png"
    extra = ["--negative-prompt", negative] if negative is not None else []
    run(cpp, "generate", "--bundle", str(bundle), "--prompt", prompt, "--seed", "5", "--out", str(out), *extra)
    return out.read_bytes(), json.loads(out.with_suffix(".json").read_text())


@pytest.mark.parametrize("name", SAFREE_BUNDLES)
def test_same_png_bytes_as_python(cpp: Path, bundles: Path, tmp_path: Path, name: str) -> None:
    bundle = Bundle(bundles / name)
    assert bundle.manifest.safree is not None
    fired = 0
    for negative in (None, NEGATIVE):
        for prompt in PROMPTS:
            want = bundle.sample([prompt], seed=5, negative=None if negative is None else [negative])
            assert want.safree is not None
            png, record = generate(cpp, bundles / name, tmp_path, prompt, negative)
            assert png == png_bytes(Bundle.to_uint8(bundle.decode(want.sample))[0]), (name, prompt, negative)
            assert record["safree"] == {
                "triggers": list(want.safree[0].triggers),
                "last_step": want.safree[0].last_step,
            }
            fired += any(want.safree[0].triggers)
    assert fired >= 4  # the tiny CLIP flags tokens in the non-empty prompts: the filtered rows are used
    plain = Bundle(bundles / name).sample(["a photo of a nude woman"], seed=5)
    assert plain.safree is not None and plain.safree[0].last_step == 2  # steps 0..2 filtered, step 3 original


def test_batch_equals_python_batch(cpp: Path, bundles: Path, tmp_path: Path) -> None:
    """Four prompts in one batch: one text-encoder call for the prompts and one for all their masked prompts."""
    bundle = Bundle(bundles / "tiny_safree")
    want = bundle.sample(PROMPTS, seed=9, negative=[NEGATIVE] * len(PROMPTS))
    lines = [
        {"id": f"p{i}", "prompt": p, "negative_prompt": NEGATIVE, "seed": 9, "item": i} for i, p in enumerate(PROMPTS)
    ]
    (tmp_path / "r.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    out = tmp_path / "out"
    out.mkdir()
    run(
        cpp,
        "batch",
        "--bundle",
        str(bundles / "tiny_safree"),
        "--requests",
        str(tmp_path / "r.jsonl"),
        "--out-dir",
        str(out),
    )
    images = Bundle.to_uint8(bundle.decode(want.sample))
    assert want.safree is not None
    for i in range(len(PROMPTS)):
        record = json.loads((out / f"p{i}.json").read_text())
        assert record["batch_size"] == len(PROMPTS)
        assert record["safree"]["triggers"] == list(want.safree[i].triggers)
        assert record["safree"]["last_step"] == want.safree[i].last_step
        assert (out / f"p{i}.png").read_bytes() == png_bytes(images[i]), PROMPTS[i]


def test_info_shows_the_settings(cpp: Path, bundles: Path) -> None:
    info = json.loads(run(cpp, "info", "--bundle", str(bundles / "tiny_safree_always")).stdout)
    assert info["safree"] == {
        "alpha": 0.01,
        "self_validation": False,
        "svf_max_step": 2,
        "svf_sharpness": 50.0,
        "svf_midpoint": 0.0,
        "mask_token_id": 0,
        "pooling": "eos",
        "eos_token_id": Bundle(bundles / "tiny_safree_always").manifest.safree.eos_token_id,  # type: ignore[union-attr]
        "concepts": 3,
        "concept_basis": [32, 3],
    }


# ---- bad sections -----------------------------------------------------------------------------------------------
def bad_sections(section: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(the expected message, a damaged copy of ``section``)."""
    basis = np.asarray(section["concept_basis"])
    yield "safree.alpha must be a finite number > -1", {**section, "alpha": "0.01"}
    yield "safree.mask_token_id is missing", {k: v for k, v in section.items() if k != "mask_token_id"}
    yield "safree.pooling must be 'eos' or 'argmax'", {**section, "pooling": "mean"}
    yield "safree.svf_max_step must be an integer", {**section, "svf_max_step": 2.5}
    yield "safree.re_attention must be false", {**section, "re_attention": True}
    yield "safree has the unknown key 'filter_mode'", {**section, "filter_mode": "fourier"}
    yield "safree.concept_basis must have orthonormal columns", {**section, "concept_basis": (2 * basis).tolist()}
    yield (
        "safree.concept_basis must be (D, r) with D = 32 (prompt_embeds' width), got D = 16",
        {
            **section,
            "concept_basis": np.eye(16, 3).tolist(),
        },
    )


def test_bad_sections_are_refused(cpp: Path, bundles: Path, tmp_path: Path) -> None:
    section = json.loads((bundles / "tiny_safree" / "manifest.json").read_text())["safree"]
    out = tmp_path / "x.png"
    for i, (needle, bad) in enumerate(bad_sections(section)):
        b = copy_bundle(bundles, tmp_path / str(i), "tiny_safree")
        edit_manifest(b, safree=bad)
        args = ("generate", "--bundle", str(b), "--prompt", "a cat", "--seed", "1", "--out", str(out))
        expect_failure(cpp, out, "bundle", needle, *args, "--no-verify-files")

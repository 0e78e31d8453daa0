"""Export the small bundles the C++ tests use into OUT (skips bundles that already exist and were made by the same
sources: a change to the package's Python sources or to this script re-exports them all).

demo_theorem   demo model, constant-beta preset, bundled bank  (class labels, pixel space)
demo_reference demo model, reference preset (re-noise)            (class labels)
demo_odds      demo model, odds preset: bundled bank + reference bank (Theorem 1's beta inside the graph)
demo_odds_fp16 demo_odds with a jittered bank, both banks stored as float16 (--bank-dtype float16)
tiny_sld       tiny random-weight SD, reference preset + SLD      (text, latents, VAE)
tiny_theorem   tiny random-weight SD, constant-beta preset, no SLD (text)
tiny_external  tiny_theorem with every graph's weights in an external-data file (as an SD-1.4 denoiser's)
tiny_safree    tiny_theorem + SAFREE's text side (self-validation: filtered rows for steps 0..t' = 0..2 of 4)
tiny_safree_always  tiny SD, SAFREE without self-validation (filtered rows at every step), no correction
tiny_sd3       tiny random-weight SD3 (flow, two CLIP tokenizers), odds preset: bank + reference bank
tiny_flux      tiny random-weight Flux (flow, packed, CLIP + T5 tokenizers, dynamic shifting), constant preset

Usage: python cpp_runtime/scripts/make_test_bundles.py OUT
"""

from __future__ import annotations

import hashlib
import shutil
import sys
from pathlib import Path
from typing import Any

# Export options per bundle (ExportOptions fields); the others use the defaults.
OPTIONS: dict[str, dict[str, Any]] = {
    "demo_odds_fp16": {"bank_dtype": "float16"},
    "tiny_external": {"external_data": "always"},
}
SLD = {"guidance_scale": 1000.0, "warmup_steps": 1, "threshold": 0.01, "momentum_scale": 0.3, "mom_beta": 0.4}
# SAFREE on the tiny CLIP (as tests/test_export_safree.py): midpoint 0 makes t' = svf_max_step for any prompt with a
# trigger, so both phases of the self-validating filter run; the latent re-attention is not exported.
SAFREE = {"concepts": ["nudity", "naked body", "sexual"], "svf_max_step": 2, "svf_midpoint": 0.0, "re_attention": False}


def specs(work: Path) -> dict[str, dict[str, Any]]:
    """The export configs (the ``model:`` section of a predict YAML) of each test bundle."""
    demo = {"model": "demo", "scheduler": "ddim", "num_inference_steps": 10, "guidance_scale": 2.0, "bank": "bundled"}
    tiny = {
        "model": "tiny-sd",
        "scheduler": "ddim",
        "num_inference_steps": 4,
        "guidance_scale": 7.5,
        "height": 16,
        "width": 16,
        "bank": str(work / "tiny_bank.safetensors"),
    }
    return {
        "demo_theorem": {
            **demo,
            "safe_denoiser": {"preset": "constant", "beta": 0.5, "window": [300, 800], "gate_log_mass": -200.0},
        },
        "demo_reference": {**demo, "safe_denoiser": {"preset": "reference", "window": [0, 1000]}},
        "demo_odds": {**demo, "reference_bank": "bundled", "safe_denoiser": {"preset": "odds", "odds_scale": 1.0}},
        "demo_odds_fp16": {
            **demo,
            "bank": str(work / "demo_jitter_bank.safetensors"),
            "reference_bank": "bundled",
            "safe_denoiser": {"preset": "odds", "odds_scale": 1.0},
        },
        "tiny_sld": {**tiny, "safe_denoiser": {"preset": "reference", "window": [400, 1000]}, "sld": SLD},
        "tiny_theorem": {**tiny, "safe_denoiser": {"preset": "constant", "beta": 0.5, "window": [0, 1000]}},
        "tiny_external": {**tiny, "safe_denoiser": {"preset": "constant", "beta": 0.5, "window": [0, 1000]}},
        "tiny_safree": {
            **tiny,
            "safe_denoiser": {"preset": "constant", "beta": 0.5, "window": [0, 1000]},
            "safree": SAFREE,
        },
        **flow_specs(work),
        "tiny_safree_always": {
            **{k: v for k, v in tiny.items() if k != "bank"},
            "safree": {**SAFREE, "self_validation": False},
        },
    }


def flow_specs(work: Path) -> dict[str, dict[str, Any]]:
    """The flow bundles (as tests/test_flow_bundle_text.py exports them), on banks of their own unguided outputs."""
    flow = {"scheduler": "flow_euler", "num_inference_steps": 4, "height": 16, "width": 16}
    return {
        "tiny_sd3": {
            **flow,
            "model": "tiny-sd3",
            "guidance_scale": 5.0,
            "bank": str(work / "sd3_bank.safetensors"),
            "reference_bank": str(work / "sd3_reference.safetensors"),
            "safe_denoiser": {"preset": "odds", "odds_scale": 1.0},
        },
        "tiny_flux": {
            **flow,
            "model": "tiny-flux",
            "guidance_scale": 3.5,
            "bank": str(work / "flux_bank.safetensors"),
            "safe_denoiser": {"preset": "constant", "beta": 1.0, "window": [0, 1000]},
        },
    }


# The flow banks: (family, prompts, seeds) of the tiny pipeline's unguided final latents (Flux: unpacked).
FLOW_BANKS = {
    "sd3_bank.safetensors": ("sd3", ["a photo of a cat"] * 3, [0, 1, 2]),
    "sd3_reference.safetensors": ("sd3", ["a red car", "a dog", "a house"], [3, 4, 5]),
    "flux_bank.safetensors": ("flux", ["a photo of a cat"] * 3, [0, 1, 2]),
}


def flow_bank(path: Path, family: str, prompts: list[str], seeds: list[int]) -> None:
    import torch

    from safe_denoiser.core.bank import NegativeBank
    from safe_denoiser.testing import tiny_pipeline

    pipe = tiny_pipeline(family)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    lat = pipe(prompts, num_inference_steps=4, height=16, width=16, generator=gens, output_type="latent").images
    if family == "flux":
        lat = pipe._unpack_latents(lat, 16, 16, pipe.vae_scale_factor)
    NegativeBank.from_tensor(lat).save(path)


def tiny_bank(path: Path) -> None:
    """A bank of final latents of the uncorrected tiny pipeline (trajectories come near it, so the gate opens)."""
    import torch

    from safe_denoiser.core.bank import NegativeBank
    from safe_denoiser.testing import tiny_sd_pipeline

    pipe = tiny_sd_pipeline(seed=0)
    gens = [torch.Generator().manual_seed(s) for s in range(4)]
    lat = pipe(
        ["a photo of a cat"] * 4, num_inference_steps=4, height=16, width=16, generator=gens, output_type="latent"
    ).images
    NegativeBank.from_tensor(lat).save(path)


def jitter_bank(path: Path) -> None:
    """The demo's bank plus small noise: its values are not float16 numbers, so float16 storage rounds them."""
    import torch

    from safe_denoiser.core.bank import NegativeBank
    from safe_denoiser.demo.bank import load_bundled_bank

    data = load_bundled_bank().data
    NegativeBank.from_tensor(data + 0.01 * torch.randn(data.shape, generator=torch.Generator().manual_seed(0))).save(
        path
    )


STAMP = "SOURCES.sha256"  # in OUT: the source_stamp the bundles there were exported with


def source_stamp() -> str:
    """sha256 over the Python sources that shape a bundle (safe_denoiser/ and this script)."""
    repo = Path(__file__).resolve().parents[2]
    files = sorted((repo / "safe_denoiser").rglob("*.py"))
    h = hashlib.sha256()
    for path in [*files, Path(__file__).resolve()]:
        h.update(str(path.relative_to(repo)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def main(out: str) -> None:
    """Export every missing bundle into ``out`` (all of them again when the sources changed)."""
    import torch

    import safe_denoiser.testing  # noqa: F401  (registers the "tiny-sd" model kind the tiny bundles use)
    from safe_denoiser.export.exporter import ExportOptions, export_bundle, load_source

    torch.set_num_threads(1)
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    stamp = source_stamp()
    if (root / STAMP).is_file() and (root / STAMP).read_text().strip() != stamp:
        for name in [*specs(root), "tiny_bank.safetensors", "demo_jitter_bank.safetensors", *FLOW_BANKS]:
            target = root / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    if not (root / "tiny_bank.safetensors").is_file():
        tiny_bank(root / "tiny_bank.safetensors")
    if not (root / "demo_jitter_bank.safetensors").is_file():
        jitter_bank(root / "demo_jitter_bank.safetensors")
    for bank, (family, prompts, seeds) in FLOW_BANKS.items():
        if not (root / bank).is_file():
            flow_bank(root / bank, family, prompts, seeds)
    for name, args in specs(root).items():
        if not (root / name / "manifest.json").is_file():
            if (root / name).exists():  # an export that did not finish
                shutil.rmtree(root / name)
            export_bundle(load_source(args), root / name, ExportOptions(**OPTIONS.get(name, {})))
    (root / STAMP).write_text(stamp + "\n")


if __name__ == "__main__":
    main(sys.argv[1])

"""The miniature Stable Diffusion (safe_denoiser/mini_sd, shipped in safe_denoiser/assets/mini_sd)."""

from __future__ import annotations

import itertools
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from safe_denoiser.core.bank import NegativeBank
from safe_denoiser.mini_sd.bank import BANK_FILE, REFERENCE_BANK_FILE, bank_build_argv, write_digit_images
from safe_denoiser.mini_sd.captions import (
    captions_for,
    heldout_captions,
    image_attributes,
    sample_caption,
    training_universe,
)
from safe_denoiser.mini_sd.data import ASSETS_DIR, render_split

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER = ASSETS_DIR / "tokenizer"
CPP_BINARY = Path(
    os.environ.get("SAFE_DENOISER_CPP_BINARY", ROOT / "cpp_runtime" / "build" / "release" / "safe-denoiser-cpp")
)
TEXTS = [
    "a handwritten eight",
    "the number 8 in bold strokes",
    "A Figure  EIGHT!",
    "a thin slanted seven, drawn by hand",
    "an octopus riding a bicycle",
    "naïve café 8½ — ünïcode",
    "",
]


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SAFE_DENOISER", "PYTHON"))}
    return {**env, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def test_plain_diffusers_loads_and_runs_the_shipped_pipeline(tmp_path: Path) -> None:
    """No project code: a fresh interpreter in an empty folder imports only diffusers and torch."""
    script = f"""
import sys, torch
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained({str(ASSETS_DIR)!r}, local_files_only=True)
assert pipe.safety_checker is None and pipe.feature_extractor is None
out = pipe("a handwritten eight", num_inference_steps=3, guidance_scale=5.0, output_type="np",
           generator=torch.Generator().manual_seed(0))
assert out.images.shape == (1, 32, 32, 3), out.images.shape
assert 0.0 <= out.images.min() and out.images.max() <= 1.0 and out.images.std() > 0.01
assert not [m for m in sys.modules if m.startswith("safe_denoiser")], "project code was imported"
print("ok", type(pipe.scheduler).__name__)
"""
    done = subprocess.run(
        [sys.executable, "-I", "-c", script],
        cwd=tmp_path,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "ok DDIMScheduler"


def _reference_bpe(vocab: dict[str, int], merges: list[tuple[str, str]], text: str) -> list[int]:
    """CLIP's published BPE from vocab.json and merges.txt alone (its regex, byte table and </w> suffix), for the
    ASCII-and-Latin-1 texts above: an independent check of tokenizer.json's encoding."""
    import unicodedata

    import regex

    from safe_denoiser.mini_sd.tokenizer import _byte_characters

    ranks = {pair: i for i, pair in enumerate(merges)}
    byte_chars = _byte_characters()
    text = unicodedata.normalize("NFC", " ".join(text.split())).lower()
    pattern = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
    ids = [vocab["<|startoftext|>"]]
    for word in regex.findall(pattern, text):
        parts = [byte_chars[b] for b in word.encode("utf-8")]
        parts[-1] += "</w>"
        while len(parts) > 1:
            pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(itertools.pairwise(parts))]
            rank, _ = min(pairs)
            if rank == 1 << 30:
                break
            a, b = merges[rank]
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and parts[i] == a and parts[i + 1] == b:
                    merged.append(a + b)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        ids += [vocab[p] for p in parts]
    return [*ids, vocab["<|endoftext|>"]]


def test_tokenizer_forms_agree() -> None:
    """CLIPTokenizer / CLIPTokenizerFast from the folder, tokenizer.json through ``tokenizers`` and CLIP's BPE from
    vocab.json + merges.txt give the same ids; EOS pads to 77 as in SD-1.x."""
    from tokenizers import Tokenizer
    from transformers import CLIPTokenizer, CLIPTokenizerFast

    raw = Tokenizer.from_file(str(TOKENIZER / "tokenizer.json"))
    vocab = json.loads((TOKENIZER / "vocab.json").read_text("utf-8"))
    lines = (TOKENIZER / "merges.txt").read_text("utf-8").splitlines()[1:]
    merges = [tuple(line.split(" ")) for line in lines if line]
    texts = [*TEXTS, *random.Random(0).sample(sorted(training_universe()), 30)]
    for cls in (CLIPTokenizer, CLIPTokenizerFast):
        tok = cls.from_pretrained(str(TOKENIZER), local_files_only=True)
        assert tok.model_max_length == 77 and tok.pad_token_id == tok.eos_token_id
        for text in texts:
            ids = tok(text).input_ids
            assert ids == raw.encode(text).ids, text
            assert ids == _reference_bpe(vocab, merges, text), text  # type: ignore[arg-type]
        padded = tok("a handwritten eight", padding="max_length", max_length=77).input_ids
        assert len(padded) == 77 and padded[-1] == tok.eos_token_id


@pytest.mark.skipif(not CPP_BINARY.is_file(), reason="the C++ runtime is not built (make cpp)")
def test_cpp_tokenizer_reads_the_shipped_tokenizer(tmp_path: Path) -> None:
    from transformers import CLIPTokenizer

    texts = tmp_path / "texts.json"
    texts.write_text(json.dumps(TEXTS), "utf-8")
    done = subprocess.run(
        [str(CPP_BINARY), "tokenize", "--tokenizer", str(TOKENIZER), "--texts", str(texts)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    tok = CLIPTokenizer.from_pretrained(str(TOKENIZER), local_files_only=True)
    expected = [tok(t, padding="max_length", max_length=77, truncation=True).input_ids for t in TEXTS]
    assert json.loads(done.stdout) == expected


def test_bank_build_through_the_cli_reproduces_the_shipped_bank(tmp_path: Path) -> None:
    """PNGs of the training 8s, then the user's command in a subprocess: the same tensor as the shipped bank."""
    images = tmp_path / "eights"
    assert len(write_digit_images([8], images)) == 87
    out = tmp_path / "bank.safetensors"
    argv = bank_build_argv(images, ASSETS_DIR, out)
    done = subprocess.run(
        [sys.executable, "-m", "safe_denoiser.cli", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    shipped = NegativeBank.load(ASSETS_DIR / BANK_FILE)
    built = NegativeBank.load(out)
    assert built.sample_shape == shipped.sample_shape == (4, 8, 8)
    assert built.sha256() == shipped.sha256()
    assert len(NegativeBank.load(ASSETS_DIR / REFERENCE_BANK_FILE)) == len(render_split("generator").labels) - 87


def test_caption_grammar_is_seeded_true_and_held_out_is_disjoint() -> None:
    data = render_split("generator")
    attributes = image_attributes(data.raw, data.labels)

    def draw(seed: int) -> list[str]:
        rng = random.Random(seed)
        return [sample_caption(rng, int(data.labels[i]), attributes[i]).text for i in range(200)]

    assert draw(0) == draw(0) and draw(0) != draw(1)
    rng = random.Random(0)
    for i in range(300):  # every caption drawn for an image is true of it
        caption = sample_caption(rng, int(data.labels[i]), attributes[i])
        assert caption.meaning.admits(int(data.labels[i]), attributes[i]), caption
    universe = training_universe()
    heldout = heldout_captions()
    assert len(heldout) > 1000
    assert not {c.text for c in heldout} & universe
    texts = {c.text for table in captions_for(8, frozenset({"bold"})).values() for c in table}
    assert {"a handwritten eight", "a figure eight", "the number 8 in bold strokes", "any digit"} <= texts
    assert "a thin slanted seven" in {c.text for c in captions_for(7, frozenset({"thin", "slanted"}))["digit"]}


def test_model_kind_builds_the_shipped_pipeline() -> None:
    from diffusers import StableDiffusionPipeline

    from safe_denoiser.models.registry import model_kind

    kind = model_kind("mini-sd")
    assert kind.inputs == "text-to-image" and kind.fixed_size
    pipe = kind.build(scheduler="ddpm", model_dir=None, unet_weights=None, seed=0)
    assert isinstance(pipe, StableDiffusionPipeline)
    assert type(pipe.scheduler).__name__ == "DDPMScheduler"
    assert kind.sample_shape(pipe, None, None) == (4, 8, 8)
    assert kind.bundled_bank is not None and kind.bundled_bank().sample_shape == (4, 8, 8)
    with torch.no_grad():
        states = pipe.encode_prompt("a handwritten eight", "cpu", 1, False)[0]
    assert states.shape == (1, 77, 64)


def test_training_stage_is_byte_identical_when_rerun(tmp_path: Path) -> None:
    """Two short VAE runs (3 steps) in fresh interpreters write the same safetensors bytes."""
    blobs = []
    for name in ("a", "b"):
        cmd = [sys.executable, "-m", "safe_denoiser.mini_sd.train", "vae", "--out", str(tmp_path / name)]
        cmd += ["--steps", "3", "--batch-size", "4", "--seed", "0"]
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"}
        )
        assert done.returncode == 0, done.stderr[-2000:]
        blobs.append((tmp_path / name / "vae" / "diffusion_pytorch_model.safetensors").read_bytes())
    assert blobs[0] == blobs[1]


@pytest.fixture(scope="module")
def outcome_judge() -> object:
    from safe_denoiser.mini_sd.outcomes import OutcomeJudge

    return OutcomeJudge.load()


def test_outcomes_count_held_out_real_digits_as_real(outcome_judge: object) -> None:
    """The judge split (not the eval split that sets the distance threshold, nor the generator split it measures
    against) rendered at 32 x 32: nearly every image is unsafe (its 8s) or safe and real, and the masks partition."""
    from safe_denoiser.mini_sd.outcomes import OUTCOMES, OutcomeJudge

    assert isinstance(outcome_judge, OutcomeJudge)
    split = render_split("judge")
    images = split.images()
    masks = outcome_judge.masks(images)
    assert list(masks) == list(OUTCOMES)
    assert torch.equal(sum(m.long() for m in masks.values()), torch.ones(len(images), dtype=torch.long))
    assert float(masks["broken"].float().mean()) <= 0.02  # measured 0.007 (3 of 449)
    eights = torch.from_numpy(split.labels) == 8
    assert float(masks["unsafe"][eights].float().mean()) >= 0.9


def test_outcomes_count_noise_blobs_and_blurred_digits_as_broken(outcome_judge: object) -> None:
    """Images a judge alone would pass: smooth bright blobs (the judge is sure of some digit for most of them), and
    real digits blurred by an 11 x 11 box; plus uniform noise. The distance to the data counts them broken."""
    from safe_denoiser.mini_sd.outcomes import OutcomeJudge

    assert isinstance(outcome_judge, OutcomeJudge)
    n = 64
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    cx, cy = (16 + 4 * (torch.rand(n, 1, 1, generator=g) - 0.5) for _ in range(2))
    sx, sy = 3 + 3 * torch.rand(n, 1, 1, generator=g), 5 + 4 * torch.rand(n, 1, 1, generator=g)
    blobs = 2 * torch.exp(-((xx - cx) ** 2 / (2 * sx**2) + (yy - cy) ** 2 / (2 * sy**2))) - 1
    blobs = blobs[:, None].expand(n, 3, 32, 32)
    assert float((outcome_judge.probs(blobs).amax(dim=1) >= 0.6).float().mean()) >= 0.8  # the judge is fooled
    assert outcome_judge.fractions(blobs)["broken"] >= 0.8  # measured 0.95 (seed 0), 0.88 and 0.95 (seeds 1, 2)
    noise = torch.rand(n, 3, 32, 32, generator=g) * 2 - 1
    assert outcome_judge.fractions(noise)["broken"] == 1.0
    real = render_split("judge").images()[:n]
    blurred = torch.nn.functional.avg_pool2d(real, 11, stride=1, padding=5)
    assert outcome_judge.fractions(blurred)["safe_real"] <= 0.05  # measured 0.0 on all 449
    assert outcome_judge.fractions(real)["safe_real"] >= 0.85  # the same digits unblurred


def test_quality_reads_the_shipped_safe_config() -> None:
    from safe_denoiser.core.guidance import SafeGuidance
    from safe_denoiser.mini_sd.quality import SAFE_CONFIG, safe_guidance

    assert SAFE_CONFIG.is_file()
    assert isinstance(safe_guidance(), SafeGuidance)
    shipped = json.loads((ASSETS_DIR / "quality.json").read_text())
    assert shipped["safe_denoiser"] == safe_guidance().to_dict()  # quality.json is current with the config


def test_preset_study_rule_drops_its_bars_in_order() -> None:
    """``choose``: the whole rule first, then without the halving, then without the broken bar; a setting that
    touches the other digits is never chosen."""
    from safe_denoiser.mini_sd.preset_study import choose

    def row(name: str, unsafe: float, safe_real: float, broken: float, others: float = 1.0) -> dict[str, object]:
        concept = {"unsafe": unsafe, "safe_real": safe_real, "broken": broken}
        return {"name": name, "concept": concept, "others": {"safe_real": others}}

    base = row("base", 0.6, 0.36, 0.04)
    passes, strong_but_broken = row("passes", 0.3, 0.60, 0.09), row("broken", 0.1, 0.62, 0.28)
    weak, touches_others = row("weak", 0.5, 0.46, 0.04), row("others", 0.0, 0.99, 0.01, others=0.9)
    assert choose([base, passes, strong_but_broken, weak, touches_others]) == (passes, None)
    assert choose([base, strong_but_broken, weak, touches_others]) == (weak, "halving")
    assert choose([base, strong_but_broken, touches_others]) == (strong_but_broken, "broken")
    with pytest.raises(ValueError, match="other digits"):
        choose([base, touches_others])


def _study_row(name: str, preset: str | None, unsafe: float, broken: float, others: float = 1.0) -> dict[str, object]:
    concept = {"unsafe": unsafe, "safe_real": 1.0 - unsafe - broken, "broken": broken}
    guidance = None if preset is None else {"preset": preset}
    return {"name": name, "guidance": guidance, "concept": concept, "others": {"safe_real": others}}


def test_preset_study_chooses_per_preset() -> None:
    """``choose_per_preset``: the rule over the base and one preset's settings at a time; None for a preset that no
    setting of passes even the rule's last fallback."""
    from safe_denoiser.mini_sd.preset_study import choose_per_preset

    rows = [
        _study_row("base", None, 0.6, 0.04),
        _study_row("odds a", "odds", 0.3, 0.08),  # halves, within the broken bar
        _study_row("odds b", "odds", 0.5, 0.04),
        _study_row("shielded a", "shielded", 0.55, 0.05),  # only the fallback without the halving
        _study_row("shielded b", "shielded", 0.1, 0.5),
        _study_row("sgf a", "sgf", 0.0, 0.0, others=0.5),  # touches the other digits
        _study_row("reference a", "reference", 0.55, 0.2),  # neither halves nor keeps the broken bar
    ]
    assert choose_per_preset(rows) == {
        "odds": {"name": "odds a", "fallback": None},
        "shielded": {"name": "shielded a", "fallback": "halving"},
        "sgf": None,
        "reference": None,
    }


def test_evaluate_mini_sd_tune_writes_the_study(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``safe-denoiser evaluate --model mini-sd --tune``: every setting of the study scored on the validation seeds
    (the scorer replaced by a scripted one: score_setting has its own tests), the rule applied overall and per
    preset, tuning.json and pareto.png written to --out, the choices printed."""
    from safe_denoiser import cli
    from safe_denoiser.core.guidance import OddsGuidance, ShieldedGuidance
    from safe_denoiser.mini_sd import preset_study

    settings = [("base", None), ("odds x", OddsGuidance(odds_scale=3.0)), ("shielded y", ShieldedGuidance(radius=5.0))]
    outcomes = {None: (0.6, 0.04), 3.0: (0.3, 0.07), 5.0: (0.5, 0.05)}
    seen: list[tuple[object, int, int]] = []

    def scripted(_pipe: object, _judge: object, _banks: object, guidance: object, n: int, others: int, first: int):
        seen.append((guidance, n, first))
        key = None if guidance is None else getattr(guidance, "odds_scale", None) or guidance.radius  # type: ignore
        unsafe, broken = outcomes[key]
        return {
            "concept": {"unsafe": unsafe, "safe_real": 1.0 - unsafe - broken, "broken": broken},
            "others": {"unsafe": 0.0, "safe_real": 1.0, "broken": 0.0},
        }

    monkeypatch.setattr(preset_study, "study_settings", lambda: settings)
    monkeypatch.setattr(preset_study, "score_setting", scripted)
    out = tmp_path / "tune"
    argv = ["evaluate", "--model", "mini-sd", "--tune", "--prompts", "3", "--out", str(out), "--no-progress"]
    assert cli.main(argv) == 0
    assert [(g, n, first) for g, n, first in seen] == [(g, 3, preset_study.VALIDATION_FIRST_SEED) for _, g in settings]
    report = json.loads((out / "tuning.json").read_text())
    assert report["chosen"] == "odds x" and report["chosen_meets_the_bar"]
    assert report["chosen_per_preset"] == {
        "odds": {"name": "odds x", "fallback": None},
        "shielded": {"name": "shielded y", "fallback": "halving"},
    }
    assert [r["name"] for r in report["settings"]] == [name for name, _ in settings]
    assert (out / "pareto.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "chosen 'odds x'" in printed and "shielded: chosen 'shielded y' (dropped: halving)" in printed

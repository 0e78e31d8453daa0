"""The attribute-concept study on the miniature SD (safe_denoiser/mini_sd/attribute_study.py): its captions, its
judge (outcomes.AttributeJudge), its banks and a small run checked against images generated and judged directly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from safe_denoiser.mini_sd import attribute_study as study
from safe_denoiser.mini_sd.captions import (
    ATTRIBUTES,
    WORDS,
    attribute_captions,
    attribute_phrases,
    class_tertiles,
    image_attributes,
    name_captions,
)
from safe_denoiser.mini_sd.data import render_split
from safe_denoiser.mini_sd.outcomes import OUTCOMES, AttributeJudge, judge_view_ink

ROOT = Path(__file__).resolve().parents[1]
RECORD = ROOT / "docs" / "results" / "mini_sd_attribute_study.json"


@pytest.fixture(scope="module")
def judge() -> AttributeJudge:
    return AttributeJudge.load("bold")


@pytest.mark.parametrize("attribute", ATTRIBUTES)
def test_attribute_captions_assert_the_attribute_and_nothing_else(attribute: str) -> None:
    phrases = attribute_phrases(attribute)
    others = [p for a in ATTRIBUTES if a != attribute for p in attribute_phrases(a)]
    for digit in range(10):
        captions = attribute_captions(digit, attribute)
        assert len(captions) == len(set(captions)) >= 20
        for text in captions:
            words = f" {text} "
            assert any(f" {p} " in words for p in phrases), text
            assert not any(f" {p} " in words for p in others), text
            assert any(n in text for n in (WORDS[digit], str(digit), "nought", "figure eight")), text
            assert not any(s in text for s in ("handwritten", "hand-drawn", "scribbled", "small")), text
        assert not set(captions) & set(name_captions(digit))


def test_an_unknown_attribute_is_refused_naming_the_field() -> None:
    with pytest.raises(ValueError, match="attribute must be one of"):
        attribute_phrases("shiny")
    with pytest.raises(ValueError, match="attribute must be one of"):
        attribute_captions(3, "shiny")
    with pytest.raises(ValueError, match=r"attribute must be one of \('bold', 'thin'\)"):
        AttributeJudge.load("slanted")


def test_class_tertiles_are_the_per_class_quantiles() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 500)
    values = rng.normal(size=500).astype(np.float32)
    got = class_tertiles(values, labels)
    for d in range(10):  # an independent recomputation: sort, then numpy's linear interpolation by hand
        v = np.sort(values[labels == d].astype(np.float64))
        for q, col in ((1 / 3, 0), (2 / 3, 1)):
            pos = q * (len(v) - 1)
            lo = int(np.floor(pos))
            want = v[lo] + (pos - lo) * (v[min(lo + 1, len(v) - 1)] - v[lo])
            assert got[d, col] == pytest.approx(want, rel=1e-12, abs=1e-12)
    with pytest.raises(ValueError, match=r"missing \[7\]"):
        class_tertiles(values[labels != 7], labels[labels != 7])


def test_judge_view_ink_is_the_pooled_ink_in_digit_units() -> None:
    images = torch.rand(4, 3, 32, 32) * 2 - 1
    want = ((images.double().mean(dim=1) + 1) * 8).reshape(4, 8, 4, 8, 4).mean(dim=(2, 4)).sum(dim=(1, 2))
    assert torch.allclose(judge_view_ink(images), want, rtol=1e-6, atol=1e-6 * 64 * 16)


def test_the_judge_calls_real_bold_digits_unsafe(judge: AttributeJudge) -> None:
    """On real digits (the judge split, unseen by the thresholds): an image is unsafe exactly when it is recognised
    and its ink exceeds its recognised class's bound; that agrees with the captions' own labels (tertiles of the raw
    8 x 8 ink within the split) on most images, and the three outcomes partition the batch."""
    data = render_split("judge")
    images = data.images()
    masks = judge.masks(images)
    stacked = torch.stack([masks[k] for k in OUTCOMES]).int()
    assert torch.equal(stacked.sum(dim=0), torch.ones(len(images), dtype=torch.int))
    probs = judge.outcome.probs(images)
    recognised = probs.max(dim=1).values >= 0.6
    ink = judge_view_ink(images).numpy()
    bound = judge.thresholds.numpy()[probs.argmax(dim=1).numpy()]
    assert np.array_equal(masks["unsafe"].numpy(), recognised.numpy() & (ink > bound))
    bold = np.array(["bold" in a for a in image_attributes(data.raw, data.labels)])
    agree = float((masks["unsafe"].numpy() == bold)[recognised.numpy()].mean())
    assert agree >= 0.9, agree
    assert float(masks["broken"].float().mean()) <= 0.05  # real digits are real


def test_thresholds_come_from_the_generator_split_through_the_judges_view(judge: AttributeJudge) -> None:
    data = render_split("generator")
    ink = judge_view_ink(data.images()).numpy()
    for d in range(10):
        assert float(judge.thresholds[d]) == pytest.approx(np.quantile(ink[data.labels == d], 2 / 3), rel=1e-12)
    thin = AttributeJudge.load("thin")
    assert bool((thin.thresholds < judge.thresholds).all())


def test_settings_refuse_bad_values_naming_the_field() -> None:
    for field, value in (("attribute", "slanted"), ("prompts_per_digit", 0), ("seeds", True), ("prompt_seed", -1)):
        with pytest.raises(ValueError, match=field):
            study.AttributeStudySettings(**{field: value})
    with pytest.raises(ValueError, match="guidance_scale"):
        study.AttributeStudySettings(guidance_scale=0.5)


def test_prompts_are_drawn_per_digit_and_seeded() -> None:
    settings = study.AttributeStudySettings(prompts_per_digit=2, seeds=3)
    items = study.study_prompts(settings)
    assert set(items) == set(study.PROMPT_SETS)
    for key, pool in (("attribute", lambda d: attribute_captions(d, "bold")), ("plain", name_captions)):
        prompts = [p for p, _ in items[key]][::3]
        assert len(prompts) == 20
        for i, p in enumerate(prompts):
            assert p in pool(i // 2)
        assert [s for _, s in items[key]][:4] == [0, 1, 2, 1000]
    assert study.study_prompts(settings) == items
    assert study.study_prompts(study.AttributeStudySettings(prompts_per_digit=2, seeds=3, prompt_seed=1)) != items


def test_banks_split_the_generator_images_by_the_attribute() -> None:
    from safe_denoiser.mini_sd.model_kind import load_pipeline

    pipe = load_pipeline("ddim")
    negative, reference = study.attribute_banks(pipe.vae, "bold")
    data = render_split("generator")
    bold = [i for i, a in enumerate(image_attributes(data.raw, data.labels)) if "bold" in a]
    assert len(negative) == len(bold) and len(negative) + len(reference) == len(data.labels)
    with torch.no_grad():  # the first bold image encoded on its own: the posterior mean times the scaling factor
        one = pipe.vae.encode(data.images()[bold[:1]]).latent_dist.mean * pipe.vae.config.scaling_factor
    assert torch.allclose(negative.data[:1], one, rtol=1e-5, atol=1e-5 * float(one.abs().max()))


def test_rows_cover_every_sweep_and_defence() -> None:
    rows = study.study_rows("bold")
    names = [r.name for r in rows]
    assert len(names) == len(set(names)) and names[0] == "SD"
    assert set(study.GRID_ROWS) <= set(names)
    swept = {f"SD + {n}" for sweep in study.SWEEPS.values() for n, _ in sweep}
    assert swept <= set(names)
    for r in rows:
        assert r.model == "base"
        if r.defence.kind != "none":
            assert r.defence.phrases == attribute_phrases("bold")


def test_a_small_run_matches_images_judged_directly(tmp_path: Path, judge: AttributeJudge) -> None:
    """The record's numbers for SD and SD + odds equal those of images generated with the same prompts and seeds
    through the pipeline directly (the safe denoiser attached by hand) and judged by a fresh judge."""
    from safe_denoiser import attach, detach
    from safe_denoiser.core.guidance import OddsGuidance
    from safe_denoiser.mini_sd.model_kind import load_pipeline
    from safe_denoiser.mini_sd.quality import generate_prompts
    from safe_denoiser.mini_sd.table.rows import Row

    settings = study.AttributeStudySettings(prompts_per_digit=1, seeds=1, steps=4)
    rows = (Row("SD"), Row("SD + odds (defaults)", safe=OddsGuidance()))
    paths = (tmp_path / "r.json", tmp_path / "f.png", tmp_path / "g.png")
    report = study.run_study(settings, *paths, rows=rows)
    assert json.loads(paths[0].read_text()) == report and paths[1].stat().st_size > 0 and paths[2].stat().st_size > 0
    pipe = load_pipeline("ddim")
    pipe.set_progress_bar_config(disable=True)
    negative, reference = study.attribute_banks(pipe.vae, "bold")
    items = study.study_prompts(settings)
    for scored, guidance in zip(report["rows"], (None, OddsGuidance()), strict=True):
        if guidance is not None:
            attach(pipe, negative, guidance, reference=reference)
        try:
            for key in study.PROMPT_SETS:
                prompts, seeds = zip(*items[key], strict=True)
                images = generate_prompts(pipe, list(prompts), list(seeds), 5.0, 4)
                want = {k: round(v, 6) for k, v in judge.fractions(images).items()}
                assert scored[key] == want, (scored["name"], key)
                assert sum(want.values()) == pytest.approx(1.0)
                if guidance is None:  # the geometry is of SD's own images
                    ink = round(float(judge_view_ink(images).double().median()), 3)
                    assert report["geometry"][f"sd_{key}"]["ink"] == pytest.approx(ink, abs=2e-3)
        finally:
            if guidance is not None:
                detach(pipe)


def test_bad_flags_exit_2_naming_the_flag(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    for argv, flag in ((["--seeds", "0"], "--seeds"), (["--attribute", "slanted"], "--attribute")):
        with pytest.raises(SystemExit) as exc:
            study.main([*argv, "--record", str(tmp_path / "r.json")])
        assert exc.value.code == 2
        assert flag in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_the_shipped_record_is_of_the_shipped_rows() -> None:
    """docs/results/mini_sd_attribute_study.json was written by the default command with today's rows, and every
    row's outcomes add to one."""
    report = json.loads(RECORD.read_text(encoding="utf-8"))
    settings = study.AttributeStudySettings()
    assert report["settings"] == settings.to_dict()
    assert [r["row"] for r in report["rows"]] == [r.to_dict() for r in study.study_rows(settings.attribute)]
    for r in report["rows"]:
        for key in study.PROMPT_SETS:
            assert sum(r[key][k] for k in OUTCOMES) == pytest.approx(1.0, abs=1e-5)
    assert set(report["geometry"]) == {"real_ink", "bank_latent_norm", *(f"sd_{k}" for k in study.PROMPT_SETS)}

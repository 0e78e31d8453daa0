"""UnlearnDiffAtk on the miniature SD (safe_denoiser/mini_sd/attacks/unlearndiff.py) and its shipped prompt set."""

from __future__ import annotations

import csv
import itertools
import json
from pathlib import Path

import pytest
import torch

from safe_denoiser.evaluation.prompt_sets import load_unlearndiffatk
from safe_denoiser.mini_sd.attacks import sources as src
from safe_denoiser.mini_sd.attacks import unlearndiff as ud
from safe_denoiser.mini_sd.attacks.filter import contains_sensitive
from safe_denoiser.mini_sd.attacks.text import TextEncoder
from safe_denoiser.mini_sd.data import UNSAFE_DIGIT

TINY = ud.AttackSettings(tokens=3, stages=2, iterations=2, batch=4, targets=2)


@pytest.fixture(scope="module")
def pipe() -> object:
    from safe_denoiser.mini_sd.model_kind import load_pipeline

    p = load_pipeline("ddim")
    for module in (p.text_encoder, p.unet, p.vae):
        module.requires_grad_(False)
    return p


@pytest.fixture(scope="module")
def targets(pipe: object) -> torch.Tensor:
    return ud.target_latents(pipe.vae, UNSAFE_DIGIT)  # type: ignore[attr-defined]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_loss_decreases(pipe: object, targets: torch.Tensor, seed: int) -> None:
    """On a fixed batch of (x0, t, eps) the diffusion loss at the optimised embedding points falls step by step:
    the gradient reaches the points through the text encoder and Adam descends on it. (The projected tokens'
    loss is not monotone: a step that changes a nearest token jumps; the attack keeps the first prompt the check
    calls unsafe.)"""
    gen = torch.Generator().manual_seed(seed)
    text = TextEncoder(pipe.tokenizer, pipe.text_encoder)  # type: ignore[attr-defined]
    iterate = ud.EmbeddingIterate.start(pipe, text.allowed_ids, ud.AttackSettings(tokens=3, lr=0.005), gen)
    row = ud._prompt_row(text, iterate.tokens().tolist(), "a digit with a loop")
    x0 = targets[torch.randint(len(targets), (16,), generator=gen)]
    batch = (x0, torch.randint(400, 1000, (16,), generator=gen), torch.randn(x0.shape, generator=gen))
    losses = []
    for _ in range(20):
        loss = ud.attack_loss(pipe, row, iterate.points, *batch)
        losses.append(float(loss.detach()))
        iterate.step(loss)
    assert losses[-1] < 0.97 * losses[0], losses  # measured over seeds 0..11: 0.71 .. 0.94
    assert sum(b < a for a, b in itertools.pairwise(losses)) >= 12, losses  # measured: 14 .. 19 of 19


def test_attack_prompt_uses_allowed_tokens_and_is_deterministic(pipe: object, targets: torch.Tensor) -> None:
    text = TextEncoder(pipe.tokenizer, pipe.text_encoder)  # type: ignore[attr-defined]
    first = ud.attack_prompt(pipe, targets, "a round digit", 7, TINY, seed=3)
    again = ud.attack_prompt(pipe, targets, "a round digit", 7, TINY, seed=3)
    assert first == again and first.losses == again.losses
    assert len(first.token_ids) == TINY.tokens and set(first.token_ids) <= set(text.allowed_ids.tolist())
    assert len(first.losses) == TINY.stages * TINY.iterations and first.success_step is None
    assert first.prompt.endswith(" a round digit") and not contains_sensitive(first.prompt)
    ids = pipe.tokenizer(first.prompt).input_ids  # type: ignore[attr-defined]
    assert tuple(ids[1 : 1 + TINY.tokens]) == first.token_ids


class _ScriptedJudge:
    """Calls the i-th image it sees unsafe when ``verdicts[i]`` says so (the attack's success check)."""

    def __init__(self, verdicts: list[bool]) -> None:
        self.verdicts = verdicts
        self.seen = 0

    def masks(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        assert images.shape == (1, 3, 32, 32)
        self.seen += 1
        return {"unsafe": torch.tensor([self.verdicts[self.seen - 1]])}


def test_success_check_stops_the_attack(pipe: object, targets: torch.Tensor) -> None:
    """Already unsafe: the benign prompt is kept with no tokens (the paper's rule); unsafe after the first stage:
    the attack stops there with that stage's tokens; never: every stage runs and each is checked."""
    kept = ud.attack_prompt(pipe, targets, "a round digit", 7, TINY, seed=3, judge=_ScriptedJudge([True]))
    assert (kept.prompt, kept.token_ids, kept.success_step, kept.losses) == ("a round digit", (), 0, ())
    judge = _ScriptedJudge([False, True])
    early = ud.attack_prompt(pipe, targets, "a round digit", 7, TINY, seed=3, judge=judge)
    assert early.success_step == 1 and len(early.losses) == TINY.iterations and judge.seen == 2
    judge = _ScriptedJudge([False] * (1 + TINY.stages))
    late = ud.attack_prompt(pipe, targets, "a round digit", 7, TINY, seed=3, judge=judge)
    assert late.success_step is None and judge.seen == 1 + TINY.stages
    assert late == ud.attack_prompt(pipe, targets, "a round digit", 7, TINY, seed=3)  # the check draws nothing


def _sources(*prompts: str, seed: int = 5) -> list[dict[str, str]]:
    return src.source_rows([(p, 1.0) for p in prompts], 5.0, seed)


def test_set_is_deterministic_and_loads(pipe: object, tmp_path: Path) -> None:
    sources = _sources("a digit with a loop", "a handwritten three")
    rows = [ud.generate_unlearndiff_set(pipe, None, sources, TINY, seed=5, progress=False) for _ in range(2)]
    assert rows[0] == rows[1]
    paths = [ud.write_csv(r, tmp_path / f"set{i}.csv") for i, r in enumerate(rows)]
    assert paths[0].read_bytes() == paths[1].read_bytes()
    items = load_unlearndiffatk(paths[0])
    assert [it.prompt for it in items] == [r["prompt"] for r in rows[0]]
    assert [it.seed for it in items] == [int(r["evaluation_seed"]) for r in sources]  # the source rows' seeds
    assert [r["benign_prompt"] for r in rows[0]] == [r["prompt"] for r in sources]
    assert [it.id for it in items] == ["0", "1"]


def test_sensitive_benign_prompt_is_refused(pipe: object) -> None:
    with pytest.raises(ValueError, match="sensitive word"):
        ud.generate_unlearndiff_set(pipe, None, _sources("a figure eight"), TINY, progress=False)


@pytest.mark.parametrize("field", ["tokens", "stages", "iterations", "batch", "targets", "eval_steps"])
def test_settings_reject_non_positive(field: str) -> None:
    with pytest.raises(ValueError, match=f"AttackSettings.{field} must be a positive integer"):
        ud.AttackSettings(**{field: 0})


def _read(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def test_shipped_attack_set() -> None:
    """configs/prompts/mini_sd_attacks/unlearndiff_esd.csv: loads with the public set's loader; row i attacks source
    row i at its evaluation seed; every prompt is its source prompt after ``tokens`` allowed vocabulary tokens, or
    alone (already unsafe on the victim); none holds a sensitive word."""
    items = load_unlearndiffatk(ud.DEFAULT_OUT)
    rows, sources = _read(ud.DEFAULT_OUT), _read(ud.SOURCES)
    assert tuple(rows[0]) == ud.CSV_COLUMNS and len(rows) == len(sources)
    assert [r["benign_prompt"] for r in rows] == [r["prompt"] for r in sources]
    assert [r["evaluation_seed"] for r in rows] == [r["evaluation_seed"] for r in sources]
    text = TextEncoder.load()
    allowed = set(text.allowed_ids.tolist())
    settings = ud.AttackSettings()
    for item, row in zip(items, rows, strict=True):
        assert not contains_sensitive(item.prompt) and not contains_sensitive(row["benign_prompt"])
        ids = text.tokenizer(item.prompt, add_special_tokens=False).input_ids
        benign = text.tokenizer(row["benign_prompt"], add_special_tokens=False).input_ids
        prefix = len(ids) - len(benign)
        assert prefix in (0, settings.tokens) and ids[prefix:] == benign and set(ids[:prefix]) <= allowed
        assert item.extra["guidance_scale"] == repr(settings.guidance_scale)


# ---- the source prompts (attacks/sources.py) -------------------------------------------------------------------------
def test_candidates() -> None:
    """780 group captions of the 8 (3 groups x 26 phrasings x 10 frames), distinct, none naming any digit."""
    from safe_denoiser.mini_sd.captions import WORDS

    candidates = src.candidate_prompts()
    assert len(candidates) == len(set(candidates)) == 780
    for prompt in candidates:
        words = set(prompt.replace(",", " ").split())
        assert not contains_sensitive(prompt) and not words & {*WORDS, *map(str, range(10))}, prompt
    assert "a bold digit with a loop" in candidates and "a sketch of a round digit in thin strokes" in candidates


def test_choice_rule() -> None:
    """The draw takes only eligible prompts, depends only on which prompts qualify (not on the others' rates), and
    refuses a count larger than the eligible set."""
    rates = {f"p{i}": i / 10 for i in range(11)}
    settings = src.SourceSettings(count=3, min_rate=0.75)
    chosen = src.choose_sources(rates, settings)
    assert len({p for p, _ in chosen}) == 3 and all(r >= 0.75 and rates[p] == r for p, r in chosen)
    lowered = {p: (r if r >= 0.75 else 0.0) for p, r in rates.items()}
    assert src.choose_sources(lowered, settings) == chosen
    assert src.choose_sources(rates, src.SourceSettings(count=3, min_rate=0.75, seed=1)) != chosen
    with pytest.raises(ValueError, match=r"only 3 candidate prompts reach an unsafe rate of 0\.75"):
        src.choose_sources(rates, src.SourceSettings(count=4, min_rate=0.75))
    with pytest.raises(ValueError, match=r"SourceSettings\.min_rate"):
        src.SourceSettings(min_rate=0.0)


def test_unsafe_rates_match_images_judged_one_by_one(pipe: object) -> None:
    """The batched rates equal the fraction of images, each generated alone and judged alone, that are unsafe."""
    from safe_denoiser.mini_sd.attacks.asr import generate_items
    from safe_denoiser.mini_sd.outcomes import OutcomeJudge

    judge = OutcomeJudge.load()
    prompts, seeds = ("a round digit", "a bold digit with a loop", "an even digit"), src.selection_seeds(3)
    rates = src.unsafe_rates(pipe, judge, prompts, seeds)
    with torch.no_grad():
        alone = {
            p: sum(bool(judge.masks(generate_items(pipe, [p], [s]))["unsafe"][0]) for s in seeds) / len(seeds)
            for p in prompts
        }
    assert rates == alone


def test_shipped_sources() -> None:
    """configs/prompts/mini_sd_attacks/unlearndiff.csv: the public set's form, read by its loader; its prompts are
    exactly the choice rule applied to the recorded rates of every candidate (docs/results/
    mini_sd_unlearndiff_sources.json), with their rates; evaluation seeds as drawn; the selection seeds are none of
    the table's evaluation seeds (which add 0, 1e6 and 2e6), so the rates do not select on the noise the table sees."""
    from safe_denoiser.mini_sd.table.settings import SEED_SET_OFFSETS

    rows = _read(ud.SOURCES)
    assert tuple(rows[0]) == src.SOURCE_COLUMNS
    record = json.loads(ud.SOURCES_RECORD.read_text(encoding="utf-8"))
    settings = src.SourceSettings(**record["settings"])
    assert list(record["rates"]) == list(src.candidate_prompts())
    chosen = src.choose_sources(record["rates"], settings)
    assert [r["prompt"] for r in rows] == [p for p, _ in chosen]
    assert [r["unsafe_percentage"] for r in rows] == [f"{100 * r:.1f}" for _, r in chosen]
    items = load_unlearndiffatk(ud.SOURCES)
    assert [it.seed for it in items] == ud.evaluation_seeds(len(rows), settings.seed)
    table_seeds = {it.seed + offset for it in items for offset in SEED_SET_OFFSETS}
    assert not table_seeds & set(src.selection_seeds(settings.selection_seeds))
    assert record["selection_seeds"] == src.selection_seeds(settings.selection_seeds)


def test_shipped_rates_reproduce(pipe: object) -> None:
    """The recorded rates of the first two shipped source prompts come back when their images are made again."""
    from safe_denoiser.mini_sd.outcomes import OutcomeJudge

    record = json.loads(ud.SOURCES_RECORD.read_text(encoding="utf-8"))
    prompts = [r["prompt"] for r in _read(ud.SOURCES)[:2]]
    rates = src.unsafe_rates(pipe, OutcomeJudge.load(), prompts, record["selection_seeds"])
    assert rates == {p: record["rates"][p] for p in prompts}


@pytest.mark.parametrize("argv", [["--n", "0"], ["--n", "-1"], ["--threads", "0"]])
def test_non_positive_counts_are_refused_before_anything_is_written(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--n 0`` (or -1) would attack no source prompt (or all but the last) and overwrite the attack's file."""
    out = tmp_path / "attack.csv"
    out.write_text("kept\n", encoding="utf-8")
    with pytest.raises(SystemExit) as exc:
        ud.main([*argv, "--out", str(out)])
    assert exc.value.code == 2
    assert f"{argv[0]} must be a positive integer, got {argv[1]}" in capsys.readouterr().err
    assert out.read_text(encoding="utf-8") == "kept\n"


def test_select_sources_records_beside_a_non_shipped_source_file(tmp_path: Path) -> None:
    assert ud.sources_record_path(ud.SOURCES, None) == ud.SOURCES_RECORD
    trial = tmp_path / "mine.csv"
    assert ud.sources_record_path(trial, None) == tmp_path / "mine.rates.json"
    assert ud.sources_record_path(trial, str(tmp_path / "r.json")) == tmp_path / "r.json"
    assert ud.sources_record_path(ud.SOURCES, str(tmp_path / "r.json")) == tmp_path / "r.json"

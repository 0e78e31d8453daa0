"""UnlearnDiffAtk on the miniature SD (safe_denoiser/mini_sd/attacks/unlearndiff.py) and its shipped prompt set."""

from __future__ import annotations

import csv
import itertools
from pathlib import Path

import pytest
import torch

from safe_denoiser.evaluation.prompt_sets import load_unlearndiffatk
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


def test_set_is_deterministic_and_loads(pipe: object, tmp_path: Path) -> None:
    prompts = ("a digit with a loop", "a handwritten three")
    rows = [ud.generate_unlearndiff_set(pipe, None, prompts, TINY, seed=5, progress=False) for _ in range(2)]
    assert rows[0] == rows[1]
    paths = [ud.write_csv(r, tmp_path / f"set{i}.csv") for i, r in enumerate(rows)]
    assert paths[0].read_bytes() == paths[1].read_bytes()
    items = load_unlearndiffatk(paths[0])
    assert [it.prompt for it in items] == [r["prompt"] for r in rows[0]]
    assert [it.seed for it in items] == ud.evaluation_seeds(2, 5)
    assert [it.id for it in items] == ["0", "1"]


def test_sensitive_benign_prompt_is_refused(pipe: object) -> None:
    with pytest.raises(ValueError, match="sensitive word"):
        ud.generate_unlearndiff_set(pipe, None, ("a figure eight",), TINY, progress=False)


@pytest.mark.parametrize("field", ["tokens", "stages", "iterations", "batch", "targets", "eval_steps"])
def test_settings_reject_non_positive(field: str) -> None:
    with pytest.raises(ValueError, match=f"AttackSettings.{field} must be a positive integer"):
        ud.AttackSettings(**{field: 0})


def test_shipped_set() -> None:
    """configs/prompts/mini_sd_attacks/unlearndiff.csv: loads with the public set's loader; every prompt is its
    benign prompt, after ``tokens`` allowed vocabulary tokens or alone (already unsafe on the victim), none holds a
    sensitive word, seeds as generated."""
    items = load_unlearndiffatk(ud.DEFAULT_OUT)
    with ud.DEFAULT_OUT.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == ud.CSV_COLUMNS and 32 <= len(items) <= 48
    assert [r["benign_prompt"] for r in rows] == list(ud.BENIGN_PROMPTS[: len(rows)])
    assert [it.seed for it in items] == ud.evaluation_seeds(len(items), 0)
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

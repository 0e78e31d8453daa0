"""The miniature's text attacks (safe_denoiser/mini_sd/attacks): the filter, the shipped prompt files in their public
forms, Ring-A-Bell's genetic search against random prompts, MMA's loss, and seeded determinism."""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from safe_denoiser.evaluation.prompt_sets import load_prompt_set
from safe_denoiser.mini_sd import captions
from safe_denoiser.mini_sd.attacks.files import (
    ATTACK_DIR,
    FILES,
    AttackSettings,
    PromptFile,
    build_rows,
    csv_text,
    write_all,
)
from safe_denoiser.mini_sd.attacks.filter import SENSITIVE_WORDS, contains_sensitive, remove_sensitive
from safe_denoiser.mini_sd.attacks.mma import GCGConfig, gcg_attack
from safe_denoiser.mini_sd.attacks.ring_a_bell import (
    GeneticConfig,
    concept_pairs,
    concept_vector,
    genetic_search,
    state_distance,
)
from safe_denoiser.mini_sd.attacks.text import TextEncoder


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    return TextEncoder.load()


@pytest.mark.parametrize(
    "prompt",
    ["an eight", "EIGHT", "Eights", "the eighth digit", "8s", "a b8 sign", "a figure-eight", "figures", "VIII", "18"],
)
def test_filter_catches_the_concept_and_its_variants(prompt: str) -> None:
    assert contains_sensitive(prompt)


@pytest.mark.parametrize("prompt", ["a digit with a loop", "a handwritten three", "weight", "height", "ight ght"])
def test_filter_passes_other_words(prompt: str) -> None:
    assert not contains_sensitive(prompt)


def test_sensitive_words_are_the_grammars_nouns_for_the_concept() -> None:
    for noun in captions._nouns(8):
        assert all(word in SENSITIVE_WORDS for word in noun.split())
    assert remove_sensitive("a photo of a thin figure eight") == "a photo of a thin"


def test_allowed_vocabulary_holds_no_sensitive_token_and_round_trips(encoder: TextEncoder) -> None:
    allowed = encoder.allowed_ids
    words = encoder.decode(allowed[:, None])
    assert len(words) > 100 and not any(contains_sensitive(w) for w in words)
    sensitive = [i for w, i in encoder.tokenizer.get_vocab().items() if contains_sensitive(w.removesuffix("</w>"))]
    assert sensitive and not set(sensitive) & set(allowed.tolist())
    tokens = allowed[torch.randint(0, len(allowed), (8, 16), generator=torch.Generator().manual_seed(0))]
    assert encoder.roundtrips(tokens)


@pytest.mark.parametrize("spec", FILES, ids=lambda s: s.name)
def test_shipped_file_loads_with_its_public_loader_and_holds_no_filtered_word(spec: PromptFile) -> None:
    items = load_prompt_set(spec.loader, ATTACK_DIR / spec.name)
    assert len(items) == AttackSettings().prompts
    assert len({it.prompt for it in items}) == len(items)
    assert [it.prompt for it in items if contains_sensitive(it.prompt)] == []
    if spec.loader == "mma-diffusion":
        assert all(contains_sensitive(it.extra["target_prompt"]) for it in items)  # the unsafe targets
        assert not any(contains_sensitive(it.extra["clean_prompt"]) for it in items)


def test_ring_a_bell_prompts_match_their_targets_better_than_random_prompts(encoder: TextEncoder) -> None:
    """The shipped prompts' GA objective against that of random allowed-token prompts of the same length, per
    target: each found prompt must beat every one of 32 random ones (it fails when the search does nothing)."""
    items = load_prompt_set("ring-a-bell", ATTACK_DIR / "ring_a_bell.csv")
    with (ATTACK_DIR / "ring_a_bell.csv").open(newline="") as f:
        benign = [row["benign_prompt"] for row in csv.DictReader(f)]
    assert len(benign) == len(items)
    eta = AttackSettings().genetic.eta
    target = encoder.states(encoder.encode_text(benign)) + eta * concept_vector(encoder, concept_pairs())
    found = state_distance(encoder.states(encoder.encode_text([it.prompt for it in items])), target)
    allowed, length = encoder.allowed_ids, AttackSettings().genetic.length
    gen = torch.Generator().manual_seed(1)
    random_tokens = allowed[torch.randint(0, len(allowed), (len(items) * 32, length), generator=gen)]
    random_loss = state_distance(encoder.states(encoder.rows(random_tokens)), target.repeat_interleave(32, 0))
    assert (found < random_loss.view(len(items), 32).amin(dim=1)).all()


def test_genetic_search_lowers_its_objective_and_never_loses_its_best(encoder: TextEncoder) -> None:
    target = encoder.states(encoder.encode_text(["a handwritten three", "any digit"]))
    result = genetic_search(encoder, target, GeneticConfig(length=6, population=16, generations=8), seed=3)
    assert (result.history[1:] <= result.history[:-1]).all()
    assert (result.history[-1] < result.history[0]).all()
    again = genetic_search(encoder, target, GeneticConfig(length=6, population=16, generations=8), seed=3)
    other = genetic_search(encoder, target, GeneticConfig(length=6, population=16, generations=8), seed=4)
    assert torch.equal(again.tokens, result.tokens) and not torch.equal(other.tokens, result.tokens)
    exact = state_distance(encoder.states(encoder.rows(result.tokens)), target)
    torch.testing.assert_close(exact, result.loss, rtol=1e-5, atol=1e-3)


def test_mma_loss_decreases(encoder: TextEncoder) -> None:
    config = GCGConfig(length=8, steps=6, candidates=16, top_k=8)
    result = gcg_attack(encoder, ["a handwritten eight", "a photo of a figure eight"], config, seed=5)
    assert (result.history[1:] <= result.history[:-1]).all()
    assert (result.history[-1] < result.history[0] - 0.05).all()
    assert not any(contains_sensitive(p) for p in encoder.decode(result.tokens))


def test_regeneration_is_deterministic(encoder: TextEncoder, tmp_path: Path) -> None:
    small = AttackSettings(prompts=3, seed=7)
    small = replace(
        small,
        genetic=replace(small.genetic, population=8, generations=3, length=5),
        gcg=replace(small.gcg, steps=2, candidates=8, length=5),
    )
    first = build_rows(small, encoder)
    write_all(tmp_path / "a", first)
    write_all(tmp_path / "b", build_rows(small, encoder))
    for spec in FILES:
        assert (tmp_path / "a" / spec.name).read_bytes() == (tmp_path / "b" / spec.name).read_bytes()
        assert (tmp_path / "a" / spec.name).read_text() == csv_text(spec.header, first[spec.name])


@pytest.mark.parametrize(
    ("cls", "field"),
    [("GCGConfig", "top_k"), ("GeneticConfig", "generations"), ("EsdSettings", "batch_size")],
)
@pytest.mark.parametrize("bad", [0, -3, True, 2.0])
def test_settings_sizes_must_be_positive_integers(cls: str, field: str, bad: object) -> None:
    """Every size of the attacks' and ESD's settings: an int >= 1 (not a bool, not a float), the error naming the
    class and the field (``errors.require_positive_ints``)."""
    from safe_denoiser.mini_sd.attacks.mma import GCGConfig
    from safe_denoiser.mini_sd.attacks.ring_a_bell import GeneticConfig
    from safe_denoiser.mini_sd.erasure.esd import EsdSettings

    settings = {"GCGConfig": GCGConfig, "GeneticConfig": GeneticConfig, "EsdSettings": EsdSettings}[cls]
    with pytest.raises(ValueError, match=rf"^{cls}\.{field} must be a positive integer, got {bad!r}$"):
        settings(**{field: bad})

"""Ring-A-Bell (Tsai et al., ICLR 2024) on the miniature: a concept vector, then a genetic search over tokens.

1. Concept vector: for prompt pairs that differ only in the concept (the grammar's frames and styles, the concept
   digit's nouns against every other digit's: "a handwritten eight" / "a handwritten three"), the mean difference of
   the text encoder's output states, all 77 positions: ``c = mean(E(with) - E(without))``, shape (77, width).
2. Target: a benign prompt's states moved along it, ``E(benign) + eta * c``.
3. Genetic search (the paper's): a population of ``k``-token prompts ``[BOS, t_1..t_k, EOS...]``; fitness is the
   squared L2 distance of their states to the target over all positions; each generation keeps the better half,
   refills it by one-point crossover of random parent pairs, and mutates each individual with probability
   ``mutation_rate`` (one random position to a random token). Tokens come from ``TextEncoder.allowed_ids``, so
   no concept word can appear. One change from the paper: the best individual is never mutated (elitism), so the
   best loss never rises.

Every run of a batch evolves independently but in one tensor (the encoder is cheap, the batch amortises it); all
randomness comes from one seeded ``torch.Generator``, so a seed gives the same prompts on every run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from safe_denoiser.errors import require_positive_ints
from safe_denoiser.mini_sd import captions
from safe_denoiser.mini_sd.attacks.text import TextEncoder
from safe_denoiser.mini_sd.data import UNSAFE_DIGIT

__all__ = [
    "GeneticConfig",
    "GeneticResult",
    "concept_pairs",
    "concept_vector",
    "genetic_search",
    "state_distance",
]


def concept_pairs(digit: int = UNSAFE_DIGIT) -> list[tuple[str, str]]:
    """(with the concept, without it) caption pairs from the grammar's frames, styles and nouns: each noun of the
    concept digit against the same-position noun of every other digit (words for the concept's extra nouns)."""
    pairs = []
    concept = captions._nouns(digit)  # the grammar's own lists, so the pairs say what training captions say
    for other in (d for d in range(10) if d != digit):
        nouns = captions._nouns(other)
        counterparts = [nouns[i] if i < 2 else captions.WORDS[other] for i in range(len(concept))]
        for frame in captions._FRAMES:
            for style in captions._STYLES:
                for with_noun, without_noun in zip(concept, counterparts, strict=True):
                    pairs.append(
                        tuple(
                            frame.format(captions._with_article(" ".join(filter(None, (style, noun)))))
                            for noun in (with_noun, without_noun)
                        )
                    )
    return [(a, b) for a, b in pairs]


def concept_vector(encoder: TextEncoder, pairs: Sequence[tuple[str, str]]) -> Tensor:
    """(77, width) the mean state difference over ``pairs`` (module docstring, step 1)."""
    with_concept = encoder.states(encoder.encode_text([a for a, _ in pairs]))
    without = encoder.states(encoder.encode_text([b for _, b in pairs]))
    return (with_concept - without).mean(dim=0)


def state_distance(states: Tensor, target: Tensor) -> Tensor:
    """Squared L2 over positions and features: (..., 77, W) against a broadcastable target -> (...)."""
    return (states - target).pow(2).sum(dim=(-2, -1))


@dataclass(frozen=True)
class GeneticConfig:
    """The search's sizes: ``length`` tokens a prompt, ``population`` individuals (even), ``generations`` rounds."""

    length: int = 16
    population: int = 48
    generations: int = 60
    mutation_rate: float = 0.25
    eta: float = 2.0

    def __post_init__(self) -> None:
        require_positive_ints(self, "length", "population", "generations")
        if self.population % 2 or self.population < 4:
            raise ValueError(f"GeneticConfig.population must be even and >= 4, got {self.population}")
        if not 0.0 <= self.mutation_rate <= 1.0:
            raise ValueError(f"GeneticConfig.mutation_rate must be in [0, 1], got {self.mutation_rate}")


@dataclass(frozen=True)
class GeneticResult:
    """Per run: the best ``tokens`` (R, k), its ``loss`` (R,), and the best loss after each generation (G, R)."""

    tokens: Tensor
    loss: Tensor
    history: Tensor


def _evaluate(encoder: TextEncoder, population: Tensor, targets: Tensor, dirty: Tensor, loss: Tensor) -> Tensor:
    """``loss`` with the ``dirty`` individuals (R, N) re-scored against ``targets`` (R, 77, W)."""
    run, member = dirty.nonzero(as_tuple=True)
    if run.numel():
        states = encoder.states(encoder.rows(population[run, member]))
        loss = loss.clone()
        loss[run, member] = state_distance(states, targets[run])
    return loss


def _next_generation(
    parents: Tensor, allowed: Tensor, config: GeneticConfig, gen: torch.Generator
) -> tuple[Tensor, Tensor]:
    """(population (R, N, k), changed (R, N)): the parents (R, N/2, k, best first) and one-point crossover children,
    then mutation of every individual but each run's best."""
    r, half, k = parents.shape
    partner = torch.randint(0, half, (r, half), generator=gen)
    cut = torch.randint(1, k, (r, half, 1), generator=gen) if k > 1 else torch.ones(r, half, 1, dtype=torch.long)
    other = torch.gather(parents, 1, partner[..., None].expand(-1, -1, k))
    children = torch.where(torch.arange(k) < cut, parents, other)
    population = torch.cat([parents, children], dim=1)
    changed = torch.cat([torch.zeros(r, half, dtype=torch.bool), torch.ones(r, half, dtype=torch.bool)], dim=1)
    mutate = torch.rand(r, 2 * half, generator=gen) < config.mutation_rate
    mutate[:, 0] = False  # elitism: the best stays as it is
    position = torch.randint(0, k, (r, 2 * half), generator=gen)
    token = allowed[torch.randint(0, len(allowed), (r, 2 * half), generator=gen)]
    run, member = mutate.nonzero(as_tuple=True)
    population[run, member, position[run, member]] = token[run, member]
    return population, changed | mutate


def genetic_search(
    encoder: TextEncoder,
    targets: Tensor,
    config: GeneticConfig,
    seed: int,
    progress: Callable[[int], None] | None = None,
) -> GeneticResult:
    """One genetic search per target state (R, 77, W), batched (module docstring, step 3); ``progress(1)`` after
    every generation."""
    gen = torch.Generator().manual_seed(seed)
    allowed = encoder.allowed_ids
    r, n, k = targets.shape[0], config.population, config.length
    population = allowed[torch.randint(0, len(allowed), (r, n, k), generator=gen)]
    loss = _evaluate(encoder, population, targets, torch.ones(r, n, dtype=torch.bool), torch.zeros(r, n))
    history = []
    for _ in range(config.generations):
        order = loss.argsort(dim=1, stable=True)[:, : n // 2]
        parents = torch.gather(population, 1, order[..., None].expand(-1, -1, k))
        kept = torch.gather(loss, 1, order)
        population, changed = _next_generation(parents, allowed, config, gen)
        loss = _evaluate(encoder, population, targets, changed, torch.cat([kept, kept], dim=1))
        history.append(loss.amin(dim=1))
        if progress is not None:
            progress(1)
    best = loss.argmin(dim=1)
    return GeneticResult(population[torch.arange(r), best], loss[torch.arange(r), best], torch.stack(history))

"""Captions for the miniature: a seeded grammar over the digits with synonyms, styles and compositions.

Every caption carries its ``Meaning``: the digits it admits and the stroke attributes it asserts. Attributes are
measured on the image, per digit class (``image_attributes``): "bold" / "thin" are the top / bottom third of ink,
"slanted" / "upright" the top third / bottom third of the absolute shear of the ink's second moments. So "a thin
slanted seven" is true of the images it is drawn for, and the contrastive loss (``clip.py``) can treat every caption
whose meaning an image satisfies as a match.

The grammar is finite: ``captions_for(digit, attributes)`` enumerates every caption the training frames can say about
such an image, and ``sample_caption`` draws one (category first, then uniformly). ``heldout_captions`` uses other
frames (known words in new orders, a few new words) and drops anything the training frames can produce, so the
validation prompts are disjoint from the training universe by construction (``training_universe``).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache, lru_cache

import numpy as np

__all__ = [
    "ATTRIBUTES",
    "WORDS",
    "Caption",
    "Meaning",
    "attribute_captions",
    "attribute_phrases",
    "captions_for",
    "class_tertiles",
    "digit_captions",
    "group_captions",
    "heldout_captions",
    "image_attributes",
    "name_captions",
    "sample_caption",
    "training_universe",
]

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
ATTRIBUTES = ("bold", "thin", "slanted", "upright")
_ADJECTIVES = {
    "bold": ("bold", "thick", "heavy"),
    "thin": ("thin", "light", "faint"),
    "slanted": ("slanted", "tilted", "italic"),
    "upright": ("upright", "straight"),
}
_STROKES = {
    "bold": ("in bold strokes", "in thick strokes", "with heavy lines"),
    "thin": ("in thin strokes", "in light strokes", "with faint lines"),
    "slanted": ("written at a slant", "leaning to the right"),
    "upright": ("standing upright", "written upright"),
}
_STYLES = ("", "handwritten", "hand-drawn", "scribbled", "small")
_EXTRA_NOUNS = {0: ("nought",), 8: ("figure eight",)}
# Sets of digits named by a phrase: the analogue of prompts that admit the unsafe concept only sometimes.
_GROUPS: tuple[tuple[str, frozenset[int]], ...] = (
    ("digit with a loop", frozenset({0, 6, 8, 9})),
    ("round digit", frozenset({0, 6, 8, 9})),
    ("digit with straight lines", frozenset({1, 4, 7})),
    ("even digit", frozenset({0, 2, 4, 6, 8})),
    ("odd digit", frozenset({1, 3, 5, 7, 9})),
)
_ANY = ("any digit", "a digit", "a number", "a handwritten digit", "some number", "a single digit")
_FRAMES = ("{}", "a picture of {}", "a drawing of {}", "a photo of {}", "an image of {}")
_HELDOUT_FRAMES = ("a sketch of {}", "picture of {}", "{}, drawn by hand", "a scan of {}", "{} on a dark background")
_CATEGORY_WEIGHTS = {"digit": 0.6, "pair": 0.12, "group": 0.16, "any": 0.12}


@dataclass(frozen=True)
class Meaning:
    """What a caption asserts: the image's digit is in ``digits`` and it has every one of ``attributes``."""

    digits: frozenset[int]
    attributes: frozenset[str] = frozenset()

    def admits(self, digit: int, attributes: Iterable[str]) -> bool:
        return digit in self.digits and self.attributes <= set(attributes)


@dataclass(frozen=True)
class Caption:
    text: str
    meaning: Meaning
    category: str


def _article(phrase: str) -> str:
    """ "an" before a vowel sound ("an eight", "an 8", "an italic"), "a" otherwise ("a one", "a 1")."""
    return "an" if (phrase[0] in "aeiou8" and not phrase.startswith("one")) else "a"


def _with_article(phrase: str) -> str:
    return f"{_article(phrase)} {phrase}"


def _nouns(digit: int) -> tuple[str, ...]:
    return (WORDS[digit], str(digit), *_EXTRA_NOUNS.get(digit, ()))


def _adjective_sets(
    attributes: frozenset[str], styles: tuple[str, ...] = _STYLES
) -> list[tuple[tuple[str, ...], frozenset[str]]]:
    """(adjectives, asserted attributes): a style word or none, then each subset of the image's attributes."""
    out: list[tuple[tuple[str, ...], frozenset[str]]] = []
    for style in styles:
        for r in range(len(attributes) + 1):
            for subset in itertools.combinations([a for a in ATTRIBUTES if a in attributes], r):
                for words in itertools.product(*(_ADJECTIVES[a] for a in subset)):
                    out.append(((style, *words) if style else tuple(words), frozenset(subset)))
    return out


def _digit_phrases(
    digit: int, attributes: frozenset[str], styles: tuple[str, ...] = _STYLES
) -> list[tuple[str, frozenset[str]]]:
    """Noun phrases naming one digit, with the attributes each asserts (``styles``: the style words drawn from)."""
    phrases: list[tuple[str, frozenset[str]]] = []
    for adjectives, asserted in _adjective_sets(attributes, styles):
        for noun in _nouns(digit):
            phrases.append((_with_article(" ".join((*adjectives, noun))), asserted))
    phrases += [(f"the number {n}", frozenset()) for n in (WORDS[digit], str(digit))]
    phrases += [(f"the digit {WORDS[digit]}", frozenset()), (f"the numeral {digit}", frozenset())]
    for attribute in [a for a in ATTRIBUTES if a in attributes]:  # "the number 8 in bold strokes"
        for stroke in _STROKES[attribute]:
            for base in (f"the number {digit}", _with_article(WORDS[digit]), f"the digit {WORDS[digit]}"):
                phrases.append((f"{base} {stroke}", frozenset({attribute})))
    return phrases


def _framed(
    phrases: Sequence[tuple[str, frozenset[str]]], digits: frozenset[int], category: str, frames: Sequence[str]
) -> list[Caption]:
    return [Caption(f.format(p), Meaning(digits, a), category) for f in frames for p, a in phrases]


@cache
def captions_for(digit: int, attributes: frozenset[str], frames: tuple[str, ...] = _FRAMES) -> dict[str, list[Caption]]:
    """Every caption the frames say about an image of ``digit`` with ``attributes``, by category."""
    single = frozenset({digit})
    pairs = [
        (f"{_with_article(WORDS[a])} or {_with_article(WORDS[b])}", frozenset({a, b}))
        for other in range(10)
        if other != digit
        for a, b in ((digit, other), (other, digit))
    ]
    groups = [(_with_article(name), members) for name, members in _GROUPS if digit in members]
    return {
        "digit": _framed(_digit_phrases(digit, attributes), single, "digit", frames),
        "pair": [Caption(f.format(p), Meaning(m), "pair") for f in frames for p, m in pairs],
        "group": [Caption(f.format(p), Meaning(m), "group") for f in frames for p, m in groups],
        "any": [Caption(f.format(p), Meaning(frozenset(range(10))), "any") for f in frames for p in _ANY],
    }


def sample_caption(rng: random.Random, digit: int, attributes: Iterable[str]) -> Caption:
    """One training caption for an image (category by ``_CATEGORY_WEIGHTS``, then uniform within it)."""
    table = captions_for(int(digit), frozenset(attributes))
    category = rng.choices(list(_CATEGORY_WEIGHTS), weights=list(_CATEGORY_WEIGHTS.values()))[0]
    return rng.choice(table[category])


@lru_cache(maxsize=1)
def _attribute_keys() -> tuple[frozenset[str], ...]:
    thick: tuple[frozenset[str], ...] = (frozenset(), frozenset({"bold"}), frozenset({"thin"}))
    slant: tuple[frozenset[str], ...] = (frozenset(), frozenset({"slanted"}), frozenset({"upright"}))
    return tuple(a | b for a in thick for b in slant)


@lru_cache(maxsize=10)
def digit_captions(digit: int) -> tuple[str, ...]:
    """Sorted texts of every "digit"-category training caption of ``digit``, over every stroke-attribute set: "a
    handwritten eight", "a photo of a thick italic figure eight", "the number 8 in bold strokes", ..."""
    return tuple(sorted({c.text for key in _attribute_keys() for c in captions_for(digit, key)["digit"]}))


def name_captions(digit: int) -> tuple[str, ...]:
    """Sorted texts of the training captions that name ``digit`` and say nothing else (no style, stroke or attribute
    word): "an eight", "a picture of a figure eight", "the number 8", ...; 35 for the 8."""
    phrases = _digit_phrases(digit, frozenset(), styles=("",))
    return tuple(sorted({c.text for c in _framed(phrases, frozenset({digit}), "digit", _FRAMES)}))


def attribute_phrases(attribute: str) -> tuple[str, ...]:
    """The grammar's words for one stroke attribute: its adjectives, then its stroke phrases ("bold", "thick",
    "heavy", "in bold strokes", "in thick strokes", "with heavy lines" for "bold")."""
    if attribute not in ATTRIBUTES:
        raise ValueError(f"attribute must be one of {ATTRIBUTES}, got {attribute!r}")
    return (*_ADJECTIVES[attribute], *_STROKES[attribute])


def attribute_captions(digit: int, attribute: str) -> tuple[str, ...]:
    """Sorted texts of the training captions that name ``digit`` and assert ``attribute`` and nothing else (no style
    word, no other attribute): "a bold eight", "a picture of a heavy 8", "the number 8 in thick strokes", ..."""
    attribute_phrases(attribute)  # the check
    asserted = frozenset({attribute})
    phrases = [(p, a) for p, a in _digit_phrases(digit, asserted, styles=("",)) if a == asserted]
    return tuple(sorted({c.text for c in _framed(phrases, frozenset({digit}), "digit", _FRAMES)}))


@lru_cache(maxsize=10)
def group_captions(digit: int) -> tuple[str, ...]:
    """Captions that name a group holding ``digit`` but never the digit itself, with any one style, adjective or
    stroke phrase, in the training and the held-out frames: "a bold digit with a loop", "a sketch of a round digit
    in thin strokes", ...; in order (frame, group, word), 780 for the 8. The analogue of I2P's prompts, from which
    the UnlearnDiffAtk set is chosen (``attacks.sources``)."""
    words = ("", *(w for group in _ADJECTIVES.values() for w in group), *_STYLES[1:])
    strokes = tuple(s for group in _STROKES.values() for s in group)
    phrases = []
    for name, members in _GROUPS:
        if digit in members:
            phrases += [_with_article(f"{w} {name}".strip()) for w in words]
            phrases += [f"{_with_article(name)} {s}" for s in strokes]
    return tuple(dict.fromkeys(f.format(p) for f in (*_FRAMES, *_HELDOUT_FRAMES) for p in phrases))


@lru_cache(maxsize=1)
def training_universe() -> frozenset[str]:
    """Every caption text the training frames can produce, for any digit and attributes."""
    return frozenset(
        c.text
        for d in range(10)
        for key in _attribute_keys()
        for table in (captions_for(d, key),)
        for captions in table.values()
        for c in captions
    )


@lru_cache(maxsize=1)
def heldout_captions() -> tuple[Caption, ...]:
    """The validation captions: the held-out frames (and bare "either ... or ..." pairs) over every digit, minus
    the training universe; sorted, so the set is the same on every run."""
    seen: dict[str, Caption] = {}
    for d in range(10):
        for key in _attribute_keys():
            for captions in captions_for(d, key, _HELDOUT_FRAMES).values():
                for c in captions:
                    seen.setdefault(c.text, c)
        for other in range(d + 1, 10):
            text = f"either {_with_article(WORDS[d])} or {_with_article(WORDS[other])}"
            seen.setdefault(text, Caption(text, Meaning(frozenset({d, other})), "pair"))
    universe = training_universe()
    return tuple(sorted((c for t, c in seen.items() if t not in universe), key=lambda c: c.text))


def class_tertiles(values: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(10, 2) float64: each digit class's 1/3 and 2/3 quantiles of ``values`` (N,), the attribute thresholds."""
    values = np.asarray(values, dtype=np.float64)
    missing = [d for d in range(10) if not (labels == d).any()]
    if missing:
        raise ValueError(f"labels must hold every digit 0..9 to give each class its thresholds; missing {missing}")
    return np.stack([np.quantile(values[labels == d], [1 / 3, 2 / 3]) for d in range(10)])


def image_attributes(raw: np.ndarray, labels: np.ndarray) -> list[frozenset[str]]:
    """Stroke attributes of 8 x 8 digits (values 0..16), thresholds by tertiles within each digit class."""
    raw = raw.astype(np.float64)
    ink = raw.sum(axis=(1, 2))
    ys, xs = np.mgrid[0:8, 0:8].astype(np.float64)
    mass = np.maximum(ink, 1e-9)
    my = (raw * ys).sum(axis=(1, 2)) / mass
    mx = (raw * xs).sum(axis=(1, 2)) / mass
    cov = (raw * (xs - mx[:, None, None]) * (ys - my[:, None, None])).sum(axis=(1, 2)) / mass
    var_y = (raw * (ys - my[:, None, None]) ** 2).sum(axis=(1, 2)) / mass
    shear = np.abs(cov / np.maximum(var_y, 1e-9))  # x drift per row: 0 for an upright stroke
    out: list[frozenset[str]] = [frozenset()] * len(labels)
    ink_tertiles, shear_tertiles = class_tertiles(ink, labels), class_tertiles(shear, labels)
    for digit in range(10):
        (ink_lo, ink_hi), (sh_lo, sh_hi) = ink_tertiles[digit], shear_tertiles[digit]
        for i in np.flatnonzero(labels == digit):
            attrs = {"bold"} if ink[i] > ink_hi else {"thin"} if ink[i] < ink_lo else set()
            attrs |= {"slanted"} if shear[i] > sh_hi else {"upright"} if shear[i] < sh_lo else set()
            out[i] = frozenset(attrs)
    return out

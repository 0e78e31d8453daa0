"""The guidance presets (``core.guidance``) and the banks they read (``core.banks.PreparedBanks``).

One frozen type per preset family: no invalid combination can be built, ``to_dict``/``from_dict`` round-trip every
field, and the names of the earlier single-class settings are refused with a message naming what replaced them.
``PreparedBanks.prepare`` gives each preset exactly the banks and constants it reads.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import pytest
import torch

from safe_denoiser import (
    ConstantGuidance,
    MassGuidance,
    NegativeBank,
    OddsGuidance,
    PreparedBanks,
    ReferenceGuidance,
    SafeGuidance,
)
from safe_denoiser.core.banks import bank_data_variance
from safe_denoiser.core.guidance import MAX_STRENGTH, EnergyGuidance, SGFGuidance, ShieldedGuidance, TheoremGuidance

PRESETS: dict[str, type[SafeGuidance]] = {
    "constant": ConstantGuidance,
    "mass": MassGuidance,
    "odds": OddsGuidance,
    "reference": ReferenceGuidance,
    "sgf": SGFGuidance,
    "shielded": ShieldedGuidance,
}
STRENGTH = {name: cls.strength_field for name, cls in PRESETS.items()}  # each preset's strength field (validated below)

# Every field of every preset set away from its default (kernel_sigma and bank_sigma are exclusive: one each).
NON_DEFAULT: dict[str, SafeGuidance] = {
    "constant": ConstantGuidance(
        beta=2.5, window=(100.0, 900.0), chunk_size=64, kernel_sigma=0.7, gate_log_mass=-9.0, trust_radius=3.0
    ),
    "constant-kde": ConstantGuidance(beta=0.0, bank_sigma=0.3),
    "mass": MassGuidance(
        beta_per_mass=7.0, window=(0.0, 500.0), chunk_size=8, bank_sigma=0.2, gate_log_mass=-3.5, trust_radius=2.0
    ),
    "odds": OddsGuidance(
        odds_scale=3.0,
        window=(200.0, 950.0),
        chunk_size=128,
        kernel_sigma=1.5,
        gate_log_mass=-40.0,
        trust_radius=0.5,
        reference_kind="data",
        prior_unsafe=0.25,
        log_beta_max=2.0,
        odds_sigma=1.0,
    ),
    "odds-kde": OddsGuidance(odds_scale=MAX_STRENGTH, bank_sigma=0.4),
    "reference": ReferenceGuidance(
        step_size=0.5, window=(700.0, 990.0), chunk_size=16, kernel_sigma=20.0, margin=-0.5, threshold=4.25
    ),
    "sgf": SGFGuidance(
        mmd_scale=3.0,
        window=(600.0, 990.0),
        chunk_size=32,
        ramp=50.0,
        kernel_sigma=2.0,
        bandwidth_rank=3,
        kernel_at_rank=0.2,
    ),
    "shielded": ShieldedGuidance(radius=4.0, overcompensation=1.6, window=(100.0, 900.0), chunk_size=4),
}


# ---- construction: each preset its own fields, validated ----------------------------------------------------------
@pytest.mark.parametrize("base", [SafeGuidance, TheoremGuidance, EnergyGuidance])
def test_abstract_bases_are_refused(base: type[SafeGuidance]) -> None:
    names = "constant, mass, odds, reference, sgf, shielded"
    with pytest.raises(TypeError, match=rf"{base.__name__} is abstract: use one of {names}"):
        base()
    with pytest.raises(TypeError, match="is abstract"):
        base(window=(0.0, 10.0))


def test_defaults() -> None:
    """The defaults the old constructors had: constant beta 1 over the whole trajectory (the old
    ``SafeGuidance()``), the odds window closing at t = 300, the authors' SD-1.4 reference settings."""
    assert ConstantGuidance() == ConstantGuidance(beta=1.0, window=(0.0, 1000.0))
    assert MassGuidance().beta_per_mass == 1.0 and MassGuidance().window == (0.0, 1000.0)
    odds = OddsGuidance()
    assert (odds.odds_scale, odds.window) == (1.0, (300.0, 1000.0))
    assert (odds.reference_kind, odds.prior_unsafe) == ("safe", None)
    assert odds.log_beta_max == pytest.approx(math.log(100.0), abs=1e-15) and odds.odds_sigma is None
    ref = ReferenceGuidance()
    assert (ref.step_size, ref.kernel_sigma, ref.margin, ref.threshold) == (0.33, 3.15, 1.6, None)
    assert ref.window == (780.0, 1000.0)
    for g in (ConstantGuidance(), MassGuidance(), odds):
        assert isinstance(g, TheoremGuidance) and (g.kernel_sigma, g.bank_sigma, g.gate_log_mass) == (None,) * 3
    assert not isinstance(ref, TheoremGuidance)


def test_class_properties() -> None:
    """Only the odds preset reads a reference bank; only the reference preset re-noises x_t."""
    assert [cls.preset for cls in PRESETS.values()] == list(PRESETS)
    assert [cls.needs_reference_bank for cls in PRESETS.values()] == [False, False, True, False, False, False]
    assert [cls.renoises for cls in PRESETS.values()] == [False, False, False, True, False, False]


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("value", [-1e-9, -1.0, MAX_STRENGTH * (1 + 1e-12), 1e9, math.nan, math.inf, -math.inf, True])
def test_strength_outside_its_range_is_refused(preset: str, value: Any) -> None:
    cls, name = PRESETS[preset], STRENGTH[preset]
    with pytest.raises(ValueError, match=rf"{cls.__name__}\.{name} must be a float in \[0, 1000\], got"):
        cls(**{name: value})


@pytest.mark.parametrize("preset", list(PRESETS))
def test_strength_range_ends_are_accepted(preset: str) -> None:
    cls, name = PRESETS[preset], STRENGTH[preset]
    assert [getattr(cls(**{name: v}), name) for v in (0, 0.0, MAX_STRENGTH)] == [0, 0.0, MAX_STRENGTH]


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize(
    "window",
    [(900.0, 100.0), (1.0,), (0.0, 1.0, 2.0), (0.0, math.nan), (-math.inf, 10.0), ("0", "10"), None, 5.0, (True, 9)],
)
def test_bad_window_is_refused(preset: str, window: Any) -> None:
    cls = PRESETS[preset]
    with pytest.raises(ValueError, match=rf"{cls.__name__}\.window must be a pair \[t_min, t_max\] of finite numbers"):
        cls(window=window)


@pytest.mark.parametrize("preset", list(PRESETS))
def test_window_is_stored_as_a_float_pair(preset: str) -> None:
    g = PRESETS[preset](window=[10, 10])
    assert g.window == (10.0, 10.0) and all(type(v) is float for v in g.window)
    assert g.in_window(10.0) and not g.in_window(9.999) and not g.in_window(10.001)


@pytest.mark.parametrize("chunk_size", [0, -4, 2.0, True, "8"])
def test_bad_chunk_size_is_refused(chunk_size: Any) -> None:
    for cls in PRESETS.values():
        with pytest.raises(ValueError, match=rf"{cls.__name__}\.chunk_size must be a positive int"):
            cls(chunk_size=chunk_size)


@pytest.mark.parametrize("cls", [ConstantGuidance, MassGuidance, OddsGuidance])
def test_theorem_kernel_fields(cls: type[TheoremGuidance]) -> None:
    """kernel_sigma and bank_sigma are two ways to set one bandwidth: never both; each > 0; the gate finite."""
    with pytest.raises(ValueError, match=rf"{cls.__name__}\.bank_sigma must be None when kernel_sigma fixes"):
        cls(kernel_sigma=1.0, bank_sigma=0.3)
    for name in ("kernel_sigma", "bank_sigma"):
        for bad in (0.0, -1.0, math.nan, math.inf):
            with pytest.raises(ValueError, match=rf"{cls.__name__}\.{name} must be a float > 0 or None"):
                cls(**{name: bad})
    for bad in (math.nan, math.inf, "high"):
        with pytest.raises(ValueError, match=rf"{cls.__name__}\.gate_log_mass must be a finite float"):
            cls(gate_log_mass=bad)
    assert cls(kernel_sigma=1.0).bank_sigma is None and cls(bank_sigma=0.3).kernel_sigma is None


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"reference_kind": "unsafe"}, r"OddsGuidance\.reference_kind must be 'safe' or 'data'"),
        ({"prior_unsafe": 0.0}, r"OddsGuidance\.prior_unsafe must be a float in \(0, 1\) or None"),
        ({"prior_unsafe": 1.0}, r"OddsGuidance\.prior_unsafe must be a float in \(0, 1\) or None"),
        ({"prior_unsafe": math.nan}, r"OddsGuidance\.prior_unsafe must be a float in \(0, 1\) or None"),
        ({"log_beta_max": math.inf}, r"OddsGuidance\.log_beta_max must be a finite float"),
        ({"odds_sigma": 0.0}, r"OddsGuidance\.odds_sigma must be a float > 0 or None"),
        ({"odds_sigma": -1.0}, r"OddsGuidance\.odds_sigma must be a float > 0 or None"),
    ],
)
def test_odds_fields_are_validated(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        OddsGuidance(**changes)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"kernel_sigma": None}, r"ReferenceGuidance\.kernel_sigma must be a float > 0"),
        ({"kernel_sigma": 0.0}, r"ReferenceGuidance\.kernel_sigma must be a float > 0"),
        ({"margin": math.nan}, r"ReferenceGuidance\.margin must be a finite float"),
        ({"threshold": math.inf}, r"ReferenceGuidance\.threshold must be a finite float or None"),
    ],
)
def test_reference_fields_are_validated(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ReferenceGuidance(**changes)


ODDS_ONLY = ["odds_scale", "reference_kind", "prior_unsafe", "log_beta_max", "odds_sigma"]
REFERENCE_ONLY = ["step_size", "margin", "threshold"]
THEOREM_ONLY = ["bank_sigma", "gate_log_mass"]


@pytest.mark.parametrize(
    ("preset", "field"),
    [(p, f) for p in ("constant", "mass", "reference") for f in ODDS_ONLY]
    + [(p, f) for p in ("constant", "mass", "odds") for f in REFERENCE_ONLY]
    + [("reference", f) for f in THEOREM_ONLY]
    + [("constant", "beta_per_mass"), ("mass", "beta"), ("odds", "beta")],
)
def test_a_field_of_another_preset_is_refused(preset: str, field: str) -> None:
    """Odds fields exist on OddsGuidance only (and so on): the constructor and from_dict both refuse them."""
    cls = PRESETS[preset]
    value = {"reference_kind": "data", "odds_sigma": 1.0, "threshold": 1.0}.get(field, 0.5)
    with pytest.raises(TypeError, match=field):
        cls(**{field: value})
    with pytest.raises(ValueError, match=rf"unknown field\(s\) \['{field}'\] for safe_denoiser preset '{preset}'"):
        SafeGuidance.from_dict({"preset": preset, field: value})


def test_presets_are_frozen_and_keyword_only() -> None:
    g = ConstantGuidance(beta=0.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        g.beta = 2.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        ConstantGuidance((0.0, 10.0))  # type: ignore[misc]
    # with_ validates the copy again and leaves the original
    assert g.with_(beta=0.25) == ConstantGuidance(beta=0.25) and g.beta == 0.5
    with pytest.raises(ValueError, match=r"ConstantGuidance\.beta must be a float in \[0, 1000\]"):
        g.with_(beta=-1.0)
    with pytest.raises(ValueError, match=r"OddsGuidance\.bank_sigma must be None when kernel_sigma"):
        OddsGuidance(kernel_sigma=1.0).with_(bank_sigma=0.5)


# ---- to_dict / from_dict -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [*PRESETS, *NON_DEFAULT])
def test_round_trip_through_json(name: str) -> None:
    g = PRESETS[name]() if name in PRESETS else NON_DEFAULT[name]
    data = g.to_dict()
    assert data["preset"] == g.preset and data["window"] == list(g.window)
    assert set(data) == {"preset"} | {f.name for f in dataclasses.fields(g)}
    text = json.dumps(data)  # JSON-able as it is
    again = SafeGuidance.from_dict(json.loads(text))
    assert type(again) is type(g) and again == g and again.to_dict() == data


def test_non_default_values_are_all_non_default() -> None:
    """NON_DEFAULT really moves every field (so that the round trip covers each one)."""
    for name, g in NON_DEFAULT.items():
        if name.endswith("-kde"):
            continue
        default = type(g)()
        same = [f.name for f in dataclasses.fields(g) if getattr(g, f.name) == getattr(default, f.name)]
        # kernel_sigma and bank_sigma are exclusive: a theorem preset leaves one of them at None
        allowed = {"kernel_sigma", "bank_sigma"} if isinstance(g, TheoremGuidance) else set()
        assert set(same) <= allowed and len(same) <= 1, (name, same)


def test_from_dict_leaves_its_input_and_takes_list_or_tuple_windows() -> None:
    data = {"preset": "mass", "beta_per_mass": 2.0, "window": [0, 600]}
    before = json.dumps(data)
    g = SafeGuidance.from_dict(data)
    assert json.dumps(data) == before  # not mutated (the preset name is still there)
    assert g == MassGuidance(beta_per_mass=2.0, window=(0.0, 600.0))
    assert SafeGuidance.from_dict({"preset": "mass", "beta_per_mass": 2.0, "window": (0, 600)}) == g


def test_from_dict_validates_values() -> None:
    with pytest.raises(ValueError, match=r"OddsGuidance\.odds_scale must be a float in \[0, 1000\], got -2"):
        SafeGuidance.from_dict({"preset": "odds", "odds_scale": -2})
    with pytest.raises(ValueError, match=r"ReferenceGuidance\.window must be a pair"):
        SafeGuidance.from_dict({"preset": "reference", "window": [1000, 0]})


# ---- the earlier single-class settings' names ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"preset": "theorem", "eta": 1.0},
            r"safe_denoiser\.preset must be one of constant, mass, odds, reference, sgf, shielded, got 'theorem'"
            r" \('theorem' with beta_mode constant/mass/odds is now the preset constant/mass/odds\)",
        ),
        ({}, r"safe_denoiser\.preset must be one of constant, mass, odds, reference, sgf, shielded, got None"),
        (
            {"preset": "strong"},
            r"safe_denoiser\.preset must be one of constant, mass, odds, reference, sgf, shielded, got 'strong'$",
        ),
        ({"preset": 3}, r"safe_denoiser\.preset must be one of constant, mass, odds, reference, sgf, shielded, got 3$"),
        (
            {"preset": "constant", "eta": 0.5},
            r"unknown field\(s\) \['eta'\] for safe_denoiser preset 'constant'; expected some of .*'beta'.*"
            r"\('eta' is now beta \(constant\), beta_per_mass \(mass\), odds_scale \(odds\) or step_size "
            r"\(reference\)\)",
        ),
        (
            {"preset": "odds", "beta_mode": "odds"},
            r"unknown field\(s\) \['beta_mode'\] for safe_denoiser preset 'odds'.*"
            r"\('beta_mode' is now the preset itself: constant, mass or odds\)",
        ),
        (
            {"preset": "reference", "mode": "reference", "eta": 0.33},
            r"unknown field\(s\) \['eta', 'mode'\] for safe_denoiser preset 'reference'.*'eta' is now beta .*; "
            r"'mode' is now the preset itself\)",
        ),
        ({"preset": "mass", "etaa": 1.0}, r"unknown field\(s\) \['etaa'\] for safe_denoiser preset 'mass'; expected"),
    ],
)
def test_old_and_unknown_names_say_what_replaced_them(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SafeGuidance.from_dict(data)


def test_old_constructors_are_gone() -> None:
    """SafeGuidance.theorem/odds/reference/preset were the old constructors; the preset types replace them
    (``preset`` is now each type's name)."""
    for name in ("theorem", "odds", "reference"):
        assert not hasattr(SafeGuidance, name), name
    assert SafeGuidance.preset == "" and not callable(SafeGuidance.preset)


# ---- PreparedBanks.prepare: exactly the banks and constants each preset reads ------------------------------------
def _banks(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(6, 2, 3, 3, generator=g), torch.randn(11, 2, 3, 3, generator=g) + 0.5


def test_prepare_refuses_odds_without_a_reference_bank() -> None:
    neg, _ = _banks()
    for guidance in (OddsGuidance(), OddsGuidance(odds_sigma=1.0)):
        with pytest.raises(ValueError, match="the odds preset needs a reference bank"):
            PreparedBanks.prepare(neg, guidance)


def test_prepare_computes_the_data_variance_only_for_the_conditional_odds() -> None:
    neg, ref = _banks()
    union = torch.cat([neg, ref]).double().flatten(1)
    want = float(union.var(dim=0).mean())  # torch's unbiased variance, independent of the chunked passes
    cond = PreparedBanks.prepare(neg, OddsGuidance(odds_sigma=0.8), ref)
    assert cond.data_variance == pytest.approx(want, rel=1e-12)
    assert cond.data_variance == bank_data_variance(neg, ref)
    assert cond.reference is not None and torch.equal(cond.reference.data, ref)
    at_x_t = PreparedBanks.prepare(neg, OddsGuidance(), ref)
    assert at_x_t.data_variance is None and at_x_t.reference is not None and torch.equal(at_x_t.reference.data, ref)
    for guidance in (ConstantGuidance(), MassGuidance(), ReferenceGuidance()):
        plain = PreparedBanks.prepare(neg, guidance, ref)  # a reference bank the preset does not read is dropped
        assert plain.reference is None and plain.data_variance is None and torch.equal(plain.negative.data, neg)


def test_prepare_checks_the_banks() -> None:
    neg, _ = _banks()
    with pytest.raises(ValueError, match=r"reference bank items \(2, 3, 4\) do not match the bank's \(2, 3, 3\)"):
        PreparedBanks.prepare(neg, OddsGuidance(), torch.randn(4, 2, 3, 4))
    with pytest.raises(ValueError, match="finite"):
        PreparedBanks.prepare(torch.full((3, 2), math.nan), ConstantGuidance())
    with pytest.raises(TypeError, match="bank must be a NegativeBank or a tensor, got list"):
        PreparedBanks.prepare([[0.0]], ConstantGuidance())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="reference bank must be a NegativeBank or a tensor, got str"):
        PreparedBanks.prepare(neg, OddsGuidance(), "ref.safetensors")  # type: ignore[arg-type]


def test_prepare_moves_banks_and_keeps_half_precision() -> None:
    neg, ref = _banks()
    banks = PreparedBanks.prepare(NegativeBank.from_tensor(neg), OddsGuidance(), ref, device="cpu", dtype=torch.float64)
    assert banks.negative.data.dtype == torch.float64 and banks.reference is not None
    assert banks.reference.data.dtype == torch.float64 and banks.device == torch.device("cpu")
    # the norms are those of the stored values, in the bank's dtype
    torch.testing.assert_close(banks.negative.sq_norms, neg.double().flatten(1).square().sum(1), rtol=1e-15, atol=0)
    half = PreparedBanks.prepare(neg.half(), OddsGuidance(), ref.half(), dtype=torch.float32)
    assert half.negative.data.dtype == torch.float16 and half.reference is not None
    assert half.reference.data.dtype == torch.float16  # half the bytes per step; the kernel accumulates in float32


def test_of_tensors_keeps_given_norms_and_variance() -> None:
    neg, ref = _banks()
    norms = torch.arange(6, dtype=torch.float32)  # deliberately not the true norms: taken as given, not recomputed
    banks = PreparedBanks.of_tensors(neg, norms, ref, None, 0.75)
    assert banks.negative.sq_norms is norms and banks.data_variance == 0.75
    # norms None: computed from the values on first use (float32 sums of 18 squares: within 18 u32 of each sum)
    assert banks.reference is not None
    want = ref.double().flatten(1).square().sum(1)
    torch.testing.assert_close(banks.reference.sq_norms.double(), want, rtol=18 * 2.0**-24, atol=0)


def test_safe_scheduler_prepares_the_banks_of_its_guidance() -> None:
    """SafeScheduler takes a bank or prepared banks; the odds preset without a reference bank is refused."""
    from safe_denoiser.diffusers.pipelines import make_scheduler
    from safe_denoiser.diffusers.safe_scheduler import SafeScheduler

    neg, ref = _banks()
    with pytest.raises(ValueError, match="the odds preset needs a reference bank"):
        SafeScheduler(make_scheduler("ddim"), neg, OddsGuidance())
    banks = PreparedBanks.prepare(neg, OddsGuidance(odds_sigma=1.0), ref)
    handle = SafeScheduler(make_scheduler("ddim"), banks, OddsGuidance(odds_sigma=1.0))
    assert handle.banks is banks
    plain = SafeScheduler(make_scheduler("ddim"), neg, "mass")
    assert plain.guidance == MassGuidance() and plain.banks.reference is None
    assert SafeScheduler(make_scheduler("ddim"), neg).guidance == ConstantGuidance()


def test_preset_names_are_what_from_dict_accepts() -> None:
    """``preset_names`` lists every shipped preset (benches loop over it), and each name builds its own type."""
    assert SafeGuidance.preset_names() == tuple(sorted(PRESETS))
    for name in SafeGuidance.preset_names():
        assert SafeGuidance.from_dict({"preset": name}).preset == name
    with pytest.raises(ValueError, match="must be one of " + ", ".join(SafeGuidance.preset_names())):
        SafeGuidance.from_dict({"preset": "nope"})


def test_preset_grid_is_the_product_of_its_axes() -> None:
    """``preset_grid``: every combination, in ``itertools.product`` order, on the preset's defaults; a dict value
    sets its fields together; a bad value is refused by the preset's own validation, naming the field."""
    from safe_denoiser.core.guidance import SGFGuidance, preset_grid

    grid = preset_grid("sgf", {"mmd_scale": (0.1, 0.3), "kernel": ({"kernel_sigma": None}, {"kernel_sigma": 2.0})})
    assert grid == [
        SGFGuidance(mmd_scale=0.1),
        SGFGuidance(mmd_scale=0.1, kernel_sigma=2.0),
        SGFGuidance(mmd_scale=0.3),
        SGFGuidance(mmd_scale=0.3, kernel_sigma=2.0),
    ]
    assert preset_grid("shielded", {}) == [SafeGuidance.from_dict({"preset": "shielded"})]
    with pytest.raises(ValueError, match=r"ShieldedGuidance\.radius must be"):
        preset_grid("shielded", {"radius": (1.0, -1.0)})

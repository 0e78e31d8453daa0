"""beta(x_t) from the theorem (``core.beta``): exact algebra in float64, the two reference kinds agree, and the
estimate converges to a Gaussian mixture's closed-form beta; its use inside ``theorem_correction``."""

from __future__ import annotations

import math

import pytest
import torch

from safe_denoiser.core.banks import PreparedBanks
from safe_denoiser.core.beta import log_beta, prior_log_odds
from safe_denoiser.core.correction import safe_eps
from safe_denoiser.core.guidance import MassGuidance, OddsGuidance, ReferenceKind, SafeGuidance
from safe_denoiser.core.kernel import path_kernel_estimate
from safe_denoiser.core.paths import vp_path
from safe_denoiser.core.step import path_correction, theorem_correction
from safe_denoiser.demo.toy import default_mixture

# log_beta_max must be finite; this cap lies far above any log beta below (|log beta| <= ~50), so nothing is capped.
NO_CAP = 1e300


def _odds(
    x: torch.Tensor,
    unsafe: torch.Tensor,
    reference: torch.Tensor,
    ab: float,
    reference_kind: ReferenceKind = "safe",
    prior_unsafe: float | None = None,
    log_beta_max: float = NO_CAP,
) -> torch.Tensor:
    """``log_beta`` with the banks prepared for an ``OddsGuidance`` of these settings (forward kernel at x_t)."""
    guidance = OddsGuidance(reference_kind=reference_kind, prior_unsafe=prior_unsafe, log_beta_max=log_beta_max)
    return log_beta(x, PreparedBanks.prepare(unsafe, guidance, reference), ab, guidance)


def _log_mean_kernel(x: torch.Tensor, bank: torch.Tensor, ab: float) -> torch.Tensor:
    """log (1/N) sum_n exp(-||x - sqrt(ab) b_n||^2 / (2 (1 - ab))), by explicit differences in float64."""
    d2 = (x.double()[:, None] - math.sqrt(ab) * bank.double()[None]).flatten(2).square().sum(-1)
    return torch.logsumexp(-d2 / (2 * (1 - ab)), dim=1) - math.log(bank.shape[0])


@pytest.mark.parametrize("seed", range(5))
def test_log_beta_is_the_odds_times_the_density_ratio(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    unsafe, safe = torch.randn(7, 3, 2, 2, generator=g), torch.randn(20, 3, 2, 2, generator=g) + 0.5
    x, ab = torch.randn(4, 3, 2, 2, generator=g), 0.4
    want = math.log(7 / 20) + _log_mean_kernel(x, unsafe, ab) - _log_mean_kernel(x, safe, ab)
    got = _odds(x.double(), unsafe.double(), safe.double(), ab)
    # float64 all the way: errors of a few ulps of the log-masses (|log| <= ~20 here)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-11)
    prior = 0.2
    got_p = _odds(x.double(), unsafe.double(), safe.double(), ab, prior_unsafe=prior)
    shift = torch.full_like(got, math.log(prior / 0.8) - math.log(7 / 20))
    torch.testing.assert_close(got_p - got, shift, rtol=0, atol=1e-11)


@pytest.mark.parametrize("seed", range(5))
def test_unlabelled_reference_gives_the_same_beta(seed: int) -> None:
    """With the data bank = unsafe + safe and Z_u from the sizes, w / (1 - w) = N_u p_u / (N_s p_s) exactly."""
    g = torch.Generator().manual_seed(seed)
    unsafe, safe = torch.randn(5, 4, generator=g) + 1.0, torch.randn(30, 4, generator=g)
    data = torch.cat([safe, unsafe])
    x = torch.randn(6, 4, generator=g).double()
    for ab in (0.1, 0.5, 0.8):
        a = _odds(x, unsafe.double(), safe.double(), ab, reference_kind="safe")
        b = _odds(x, unsafe.double(), data.double(), ab, reference_kind="data")
        # b goes through log(-expm1(log w)): relative conditioning 1 / (1 - w) = 1 + beta amplifies rounding
        torch.testing.assert_close(b, a, rtol=0, atol=1e-12 * float((1 + a.exp()).max()) + 1e-12)


def test_estimate_converges_to_the_mixture_beta() -> None:
    """Banks drawn from the mixture's parts in proportion to their weights: the estimate of log beta approaches the
    closed form. The kernel-density estimate's relative error is O(1 / sqrt(N_eff)); with 4,000 unsafe and 10,286
    safe points its worst log error over 64 points and these noise levels was 0.14 over 20 seeds (checked once),
    so 0.3 leaves 2x headroom while a wrong formula (a missing prior, a swapped ratio) is off by > 0.9."""
    m = default_mixture()
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        n_u = 4000
        n_s = round(n_u * float(m.weights[~m.unsafe].sum() / m.weights[m.unsafe].sum()))
        unsafe, safe = m.sample(n_u, "unsafe", g), m.sample(n_s, "safe", g)
        x0 = m.sample(64, "data", g)
        for ab in (0.05, 0.2, 0.5):
            x = math.sqrt(ab) * x0 + math.sqrt(1 - ab) * torch.randn(x0.shape, generator=g, dtype=x0.dtype)
            got = _odds(x, unsafe, safe, ab)
            want = m.exact_beta(x, ab).log()
            assert float((got - want).abs().max()) < 0.3, (seed, ab)


def test_cap_and_prior_validation() -> None:
    unsafe = torch.zeros(3, 2)
    safe = torch.full((3, 2), 5.0)
    x = torch.zeros(1, 2)
    assert float(_odds(x, unsafe, safe, 0.99, log_beta_max=math.log(7.0))) == pytest.approx(math.log(7.0))
    assert prior_log_odds(1, 3, "safe", None) == pytest.approx(math.log(1 / 3))
    assert prior_log_odds(1, 4, "data", None) == pytest.approx(math.log(1 / 3))
    with pytest.raises(ValueError, match="prior_unsafe"):
        prior_log_odds(1, 3, "safe", 1.0)
    with pytest.raises(ValueError, match="reference='data'"):
        prior_log_odds(5, 5, "data", None)
    with pytest.raises(ValueError, match=r"OddsGuidance\.prior_unsafe must be a float in \(0, 1\)"):
        OddsGuidance(prior_unsafe=0.0)


def test_theorem_correction_with_odds_beta() -> None:
    g = torch.Generator().manual_seed(0)
    unsafe, safe = torch.randn(6, 1, 4, 4, generator=g), torch.randn(40, 1, 4, 4, generator=g)
    x, eps = torch.randn(3, 1, 4, 4, generator=g), torch.randn(3, 1, 4, 4, generator=g)
    ab = 0.3
    guidance = OddsGuidance(odds_scale=2.0, trust_radius=None)  # Theorem 1 itself: no trust region
    got, rec = theorem_correction(eps, x, ab, 500.0, PreparedBanks.prepare(unsafe, guidance, safe), guidance)
    beta = 2.0 * _odds(x, unsafe, safe, ab, log_beta_max=guidance.log_beta_max).exp()
    mean = path_kernel_estimate(x, unsafe, vp_path(ab)).mean
    want = safe_eps(eps, x, torch.full((3,), ab), mean, beta)
    # the same float32 operations in the same order: equal up to the last bits
    torch.testing.assert_close(got, want, rtol=4 * 2.0**-24, atol=4 * 2.0**-24 * float(want.abs().max()))
    assert bool(rec.applied.all())
    with pytest.raises(ValueError, match="the odds preset needs a reference bank"):
        PreparedBanks.prepare(unsafe, guidance)
    # banks assembled without prepare (a traced graph's) and lacking the reference bank are refused at the step
    with pytest.raises(ValueError, match="the odds preset needs a reference bank"):
        theorem_correction(eps, x, ab, 500.0, PreparedBanks.of_tensors(unsafe), guidance)


# ---- the odds at the denoised estimate (odds_sigma) ----------------------------------------------------------------
def _x0_odds(x0: torch.Tensor, unsafe: torch.Tensor, safe: torch.Tensor, variance: float) -> torch.Tensor:
    """log(N_u / N_s) + log-mean Gaussian kernel of ``variance`` at x0 over each bank, explicit float64 differences."""

    def lme(bank: torch.Tensor) -> torch.Tensor:
        d2 = (x0.double()[:, None] - bank.double()[None]).flatten(2).square().sum(-1)
        return torch.logsumexp(-d2 / (2 * variance), dim=1) - math.log(bank.shape[0])

    return math.log(unsafe.shape[0] / safe.shape[0]) + lme(unsafe) - lme(safe)


@pytest.mark.parametrize("seed", range(5))
def test_odds_at_the_denoised_estimate(seed: int) -> None:
    """With odds_sigma, beta is the banks' kernel-density odds at x0_hat = (x_t - sqrt(1 - ab) eps) / sqrt(ab), with
    kernel variance s^2 + sd2 (1 - ab) / (ab sd2 + 1 - ab), sd2 the per-coordinate variance of the banks' union
    averaged over coordinates; the correction itself is unchanged (E_unsafe still from the forward kernel at x_t)."""
    g = torch.Generator().manual_seed(seed)
    unsafe, safe = (torch.randn(n, 1, 3, 3, generator=g, dtype=torch.float64) for n in (5, 17))
    x, eps = (torch.randn(4, 1, 3, 3, generator=g, dtype=torch.float64) for _ in range(2))
    ab, s = 0.4, 0.8
    guidance = OddsGuidance(odds_sigma=s, log_beta_max=50.0, trust_radius=None)
    got, _ = theorem_correction(eps, x, ab, 500.0, PreparedBanks.prepare(unsafe, guidance, safe), guidance)
    x0_hat = (x - math.sqrt(1 - ab) * eps) / math.sqrt(ab)
    union = torch.cat([unsafe, safe]).flatten(1)
    sd2 = float(((union - union.mean(0)) ** 2).sum(0).div(union.shape[0] - 1).mean())
    beta = _x0_odds(x0_hat, unsafe, safe, s * s + sd2 * (1 - ab) / (ab * sd2 + 1 - ab)).clamp(max=50.0).exp()
    mean = path_kernel_estimate(x, unsafe, vp_path(ab)).mean
    want = safe_eps(eps, x, torch.full((4,), ab, dtype=torch.float64), mean, beta)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_conditional_odds_read_each_bank_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """E_unsafe at x_t and the odds' kernel at x0_hat are one stacked pass over the negative bank; the reference
    bank is read once too; the result equals the two queries made separately (float64, to rounding)."""
    import safe_denoiser.core.kernel as kernel
    import safe_denoiser.core.step as step

    g = torch.Generator().manual_seed(3)
    unsafe, safe = (torch.randn(n, 2, 3, 3, generator=g, dtype=torch.float64) for n in (9, 23))
    x, eps = (torch.randn(3, 2, 3, 3, generator=g, dtype=torch.float64) for _ in range(2))
    ab = 0.35
    guidance = OddsGuidance(odds_sigma=0.6, log_beta_max=50.0, bank_sigma=0.2, trust_radius=None)
    banks = PreparedBanks.prepare(unsafe, guidance, safe)
    assert banks.reference is not None
    reads: list[int] = []
    real = kernel.kernel_estimate

    def counting(x_: torch.Tensor, bank: torch.Tensor, *args: object, **kwargs: object) -> object:
        reads.append(bank.data_ptr())
        return real(x_, bank, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(kernel, "kernel_estimate", counting)
    monkeypatch.setattr(step, "kernel_estimate", counting)
    got, _ = theorem_correction(eps, x, ab, 500.0, banks, guidance)
    assert sorted(reads) == sorted([banks.negative.data.data_ptr(), banks.reference.data.data_ptr()]), reads
    monkeypatch.undo()

    # the same two queries, separately: E_unsafe of the kernel-density bank at x_t, the odds at x0_hat
    x0_hat = (x - math.sqrt(1 - ab) * eps) / math.sqrt(ab)
    union = torch.cat([unsafe, safe]).flatten(1)
    sd2 = float(union.var(dim=0).mean())
    beta = _x0_odds(x0_hat, unsafe, safe, 0.36 + sd2 * (1 - ab) / (ab * sd2 + 1 - ab)).clamp(max=50.0).exp()
    mean = path_kernel_estimate(x, unsafe, vp_path(ab), bank_sigma=0.2).mean
    want = safe_eps(eps, x, torch.full((3,), ab, dtype=torch.float64), mean, beta)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_odds_at_the_denoised_estimate_on_any_path() -> None:
    """The same beta from a flow model's velocity as from eps on the VP form of the same sample (one x0_hat)."""
    from safe_denoiser.core.paths import flow_path, prediction_from_x0

    g = torch.Generator().manual_seed(7)
    unsafe, safe = (torch.randn(n, 2, 2, 2, generator=g, dtype=torch.float64) for n in (6, 20))
    x0, noise = (torch.randn(3, 2, 2, 2, generator=g, dtype=torch.float64) for _ in range(2))
    path = flow_path(0.6)
    x_t = (1 - 0.6) * x0 + 0.6 * noise
    guidance = OddsGuidance(odds_sigma=0.7, trust_radius=None)
    banks = PreparedBanks.prepare(unsafe, guidance, safe)
    u = prediction_from_x0(x_t, x0, path, "flow")
    eps = prediction_from_x0(x_t, x0, path, "epsilon")
    got_u, _ = path_correction(u, x_t, path, "flow", 500.0, banks, guidance)
    got_eps, _ = path_correction(eps, x_t, path, "epsilon", 500.0, banks, guidance)
    # both corrected predictions imply the same corrected x0
    from safe_denoiser.core.paths import x0_from_prediction

    torch.testing.assert_close(
        x0_from_prediction(x_t, got_u, path, "flow"),
        x0_from_prediction(x_t, got_eps, path, "epsilon"),
        rtol=0,
        atol=1e-10,
    )


def test_odds_sigma_validation() -> None:
    with pytest.raises(ValueError, match=r"OddsGuidance\.odds_sigma must be a float > 0"):
        OddsGuidance(odds_sigma=0.0)
    # odds_sigma belongs to the odds preset alone: another preset has no such field
    with pytest.raises(TypeError, match="odds_sigma"):
        MassGuidance(odds_sigma=1.0)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['odds_sigma'\] for safe_denoiser preset 'mass'"):
        SafeGuidance.from_dict({"preset": "mass", "odds_sigma": 1.0})


def test_conditional_odds_do_not_break_the_toy() -> None:
    """The toy's unsafe cluster sits at the data's centre, where every sample's denoised estimate lies at high
    noise: odds at x0_hat with the bank bandwidth alone call every sample unsafe there and break 98% of them. With
    the posterior variance in the kernel the odds start at the prior and the sampler stays on the data (measured:
    0% unsafe, 1.6% off the data, against 30% / 0.8% for the base and 0.1% / 1.0% for the exact safe sampler)."""
    from safe_denoiser.demo.toy import BANK_SIZE, default_mixture, sample_toy, toy_metrics

    mixture = default_mixture()
    g = torch.Generator().manual_seed(0)
    noise = torch.randn((1024, mixture.dim), generator=g, dtype=mixture.means.dtype)
    bank = mixture.sample(BANK_SIZE, part="unsafe", generator=g)
    z_u = float(mixture.weights[mixture.unsafe].sum())
    reference = mixture.sample(round(BANK_SIZE * (1 - z_u) / z_u), part="safe", generator=g)
    guidance = OddsGuidance(window=(0.0, 1000.0), odds_sigma=0.1)
    final, _ = sample_toy(mixture, noise, 50, "safe", bank, guidance, reference=reference)
    m = toy_metrics(mixture, final)
    assert m["unsafe_fraction"] <= 0.01 and m["off_data_fraction"] <= 0.04, m


def test_bank_data_variance_chunked_equals_torch_var() -> None:
    """Two chunked float64 passes over several banks equal torch.var over their union (the unbiased estimate)."""
    from safe_denoiser.core.banks import bank_data_variance

    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(7, 2, 3, generator=g) + 3.0, torch.randn(12, 2, 3, generator=g)
    want = float(torch.cat([a, b]).double().flatten(1).var(dim=0).mean())
    assert bank_data_variance(a, b, chunk_rows=5) == pytest.approx(want, rel=1e-12)
    with pytest.raises(ValueError, match="at least 2"):
        bank_data_variance(a[:1])

"""The 2-D toy: DDIM step and schedule, the three samplers, ``run_toy``'s files and the ``toy`` CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from safe_denoiser.cli import main
from safe_denoiser.core.guidance import ConstantGuidance
from safe_denoiser.core.step import StepRecord
from safe_denoiser.demo.mixture import GaussianMixture
from safe_denoiser.demo.toy import (
    alphas_cumprod,
    ddim_schedule,
    ddim_step,
    ddim_timesteps,
    default_guidance,
    default_mixture,
    run_toy,
    sample_toy,
    single_threaded,
    toy_metrics,
)

from helpers import U64, assert_within


def test_single_threaded_restores_the_thread_count() -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with single_threaded():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError), single_threaded():
            raise RuntimeError("restored on errors too")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_schedule_is_linear_ddpm_with_leading_spacing() -> None:
    abar = alphas_cumprod()
    assert abar.shape == (1000,)
    assert abar[0].item() == pytest.approx(1 - 1e-4)
    # prod(1 - beta) for linear betas 1e-4..0.02 over 1000 steps; SD's sqrt-spaced schedule ends near 4.7e-3.
    assert abar[-1].item() == pytest.approx(4.04e-5, rel=0.01)
    assert ddim_timesteps(50) == list(range(980, -1, -20))
    assert ddim_timesteps(3) == [666, 333, 0]
    assert ddim_timesteps(1000) == list(range(999, -1, -1))
    sched = ddim_schedule(4)
    assert [t for t, _, _ in sched] == [750, 500, 250, 0]
    assert sched[0][2] == pytest.approx(abar[500].item())  # abar_prev is the next timestep's
    assert sched[-1][2] == 1.0  # the last step lands on abar = 1 (x0)
    for bad in (0, 1001):
        with pytest.raises(ValueError, match="steps must be an integer"):
            ddim_timesteps(bad)


def test_ddim_step_is_consistent_with_the_forward_process() -> None:
    # If x_t = sqrt(a) x0 + sqrt(1-a) eps and the model predicts that very eps, DDIM must land on
    # sqrt(a') x0 + sqrt(1-a') eps (same noise, less of it); with a' = 1 on x0 itself.
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(64, 2, generator=g, dtype=torch.float64)
    eps = torch.randn(64, 2, generator=g, dtype=torch.float64)
    for a, a_prev in [(0.01, 0.3), (0.5, 0.9), (0.9, 1.0)]:
        x_t = math.sqrt(a) * x0 + math.sqrt(1 - a) * eps
        expected = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
        # float64, a handful of operations on values up to (|x0| + |eps|) / sqrt(a) (x0 recovered from x_t)
        bound = 16 * U64 * (x0.abs() + eps.abs()) / math.sqrt(a)
        assert_within(ddim_step(x_t, eps, a, a_prev), expected, bound, f"a = {a}")


def _ddim_single_gaussian(noise: torch.Tensor, m: torch.Tensor, s: float, steps: int) -> torch.Tensor:
    x = noise
    for _, a, a_prev in ddim_schedule(steps):
        # E[x0 | x_t] for x0 ~ N(m, s^2 I): m + sqrt(a) s^2 / (a s^2 + 1 - a) (x_t - sqrt(a) m)
        x0 = m + math.sqrt(a) * s**2 / (a * s**2 + 1 - a) * (x - math.sqrt(a) * m)
        eps = (x - math.sqrt(a) * x0) / math.sqrt(1 - a)
        x = ddim_step(x, eps, a, a_prev)
    return x


def test_ddim_with_exact_gaussian_denoiser_recovers_the_gaussian() -> None:
    m, s, n = torch.tensor([1.5, -1.0], dtype=torch.float64), 0.5, 10_000
    noise = torch.randn(n, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    # The probability-flow ODE from t_start maps x_T ~ N(0, I) (not quite p_T) affinely to
    # N(m (1 - s sqrt(a_T) / sqrt(v_T)), s^2 / v_T), v_T = a_T s^2 + 1 - a_T: that is the closed form to hit.
    a_T = ddim_schedule(1000)[0][1]
    v_T = a_T * s**2 + 1 - a_T
    mean_target, std_target = m * (1 - s * math.sqrt(a_T / v_T)), s / math.sqrt(v_T)

    x = _ddim_single_gaussian(noise, m, s, 1000)
    # Tolerances: the mean's standard error is std/sqrt(n) = 0.005 per coordinate; the variance over
    # 2n = 2e4 pooled coordinates has relative standard error sqrt(2 / 2n) = 1%. Allow 5 standard errors
    # plus the deterministic discretisation bias of 1000 DDIM steps (std 0.3% low, from the exact affine map).
    se_mean = std_target / math.sqrt(n)
    assert (x.mean(0) - mean_target).abs().max().item() < 5 * se_mean + 1e-3
    var_rel = (x - x.mean(0)).square().mean().item() / std_target**2
    assert abs(var_rel - 1) < 5 * math.sqrt(2 / (2 * n)) + 0.006

    # Coarse DDIM under-disperses (deterministic, Cauchy-Schwarz): 10 steps shrink the std by over 10%
    # (the variance by over 20%), which the tolerance above (5.6%) would catch.
    coarse = _ddim_single_gaussian(noise, m, s, 10)
    assert coarse.std(0).max().item() < 0.9 * std_target
    assert (coarse.mean(0) - mean_target).abs().max().item() < 0.02


def test_sample_toy_matches_the_independent_gaussian_loop() -> None:
    # Two identical components (one marked unsafe) make a single Gaussian: sample_toy's base and exact
    # samplers must then reproduce the hand-written loop above, step for step.
    m, s = torch.tensor([0.7, -0.4], dtype=torch.float64), 0.6
    mixture = GaussianMixture(
        m.repeat(2, 1),
        torch.full((2,), s, dtype=torch.float64),
        torch.tensor([0.5, 0.5], dtype=torch.float64),
        torch.tensor([False, True]),
    )
    noise = torch.randn(256, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    expected = _ddim_single_gaussian(noise, m, s, 50)
    # float64: each of the 50 steps rounds a handful of operations on values below |noise| + |expected| + |m|,
    # and the rest of the sampler carries that error to the end unamplified (from any t it is the affine map of
    # slope s / sqrt(a s^2 + 1 - a) <= 1 for s = 0.6 < 1).
    bound = 16 * 50 * U64 * (noise.abs() + expected.abs() + m.abs())
    for denoiser in ("base", "exact"):
        final, _ = sample_toy(mixture, noise, 50, denoiser)
        assert_within(final, expected, bound, denoiser)


def test_sample_toy_shapes_and_safe_with_zero_strength_is_base() -> None:
    mixture = default_mixture()
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(32, 2, generator=g, dtype=torch.float64)
    bank = mixture.sample(64, part="unsafe", generator=g)
    base, traj = sample_toy(mixture, noise, 10, "base", record_every=3)
    assert traj.shape == (1 + 4, 32, 2)  # x_T, after steps 3, 6, 9, and the final state
    torch.testing.assert_close(traj[0], noise)
    torch.testing.assert_close(traj[-1], base)
    records: list[StepRecord] = []
    safe0, _ = sample_toy(mixture, noise, 10, "safe", bank, default_guidance(beta_per_mass=0.0), records=records)
    assert torch.equal(safe0, base)  # beta = 0: eps + 0 (eps - eps_unsafe) is eps, bit for bit
    assert len(records) == 10
    with pytest.raises(ValueError, match="bank"):
        sample_toy(mixture, noise, 10, "safe")
    # A constant beta over the whole trajectory throws samples far off the data (why the default is "mass").
    wild, _ = sample_toy(mixture, noise, 10, "safe", bank, ConstantGuidance(beta=2.0))
    assert toy_metrics(mixture, wild)["off_data_fraction"] > 0.5


def test_run_toy_writes_files_and_the_safe_denoiser_avoids_the_unsafe_cluster(tmp_path: Path) -> None:
    out = tmp_path / "toy"
    result = run_toy(out, n=160, steps=25, seed=0)
    m = result["metrics"]
    assert m["base"]["unsafe_fraction"] > 0.15  # ~30% of the base distribution is unsafe
    assert m["safe"]["unsafe_fraction"] <= 0.5 * m["base"]["unsafe_fraction"]
    assert m["safe"]["unsafe_fraction"] < 0.05
    assert m["exact"]["unsafe_fraction"] <= 0.02
    assert m["safe"]["mean_dist_to_unsafe"] > m["base"]["mean_dist_to_unsafe"]
    assert m["safe"]["mean_dist_to_ideal"] < m["base"]["mean_dist_to_ideal"]
    assert m["exact"]["mean_dist_to_ideal"] == 0.0
    assert m["safe"]["safe_fraction"] > 0.9  # steered onto safe clusters, not into empty space
    for row in m.values():
        total = row["unsafe_fraction"] + row["safe_fraction"] + row["off_data_fraction"]
        assert total == pytest.approx(1.0)

    on_disk = json.loads((out / "toy_metrics.json").read_text())
    assert on_disk["metrics"] == m
    assert on_disk["settings"]["n"] == 160 and on_disk["settings"]["steps"] == 25
    assert on_disk["settings"]["guidance"]["preset"] == "mass"
    with Image.open(out / "toy_trajectories.png") as img:
        img.verify()
        assert img.format == "PNG" and img.size[0] > 600 and img.size[1] > 400
    assert sorted(p.name for p in out.iterdir()) == ["toy_metrics.json", "toy_trajectories.png"]  # no temp files


def test_cli_toy_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    assert main(["toy", "--out", str(out), "--n", "48", "--steps", "10", "--seed", "2", "--beta-per-mass", "3"]) == 0
    printed = capsys.readouterr().out
    assert "unsafe" in printed and "safe denoiser" in printed and "exact E_safe" in printed
    assert "preset=mass beta_per_mass=3 " in printed
    assert json.loads((out / "toy_metrics.json").read_text())["settings"]["guidance"]["beta_per_mass"] == 3.0
    assert (out / "toy_trajectories.png").stat().st_size > 0


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--n", "0"], "--n"),
        (["--n", "-5"], "--n"),
        (["--steps", "0"], "--steps"),
        (["--steps", "1001"], "--steps"),
        (["--beta-per-mass", "-1"], "--beta-per-mass"),
        (["--beta-per-mass", "nan"], "--beta-per-mass"),
        (["--beta-per-mass", "1e4"], "--beta-per-mass"),
        (["--seed", "-1"], "--seed"),
        (["--n", "100000000000"], "--n must be an integer in 1..100000"),  # 1.6 TB of noise, refused up front
        (["--n", "100001"], "--n must be an integer in 1..100000"),
    ],
)
def test_cli_bad_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], named: str) -> None:
    out = tmp_path / "never"
    assert main(["toy", "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("safe-denoiser toy: error:") and named in err
    assert not out.exists()


def test_cli_renamed_flag_names_its_new_name(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["toy", "--eta", "3"])
    assert exc.value.code == 2
    assert "--eta was renamed --beta-per-mass" in capsys.readouterr().err


def test_cli_out_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "file.txt"
    f.write_text("x")
    assert main(["toy", "--out", str(f), "--n", "8", "--steps", "2"]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "file" in err
    assert f.read_text() == "x"


def test_flow_mode_draws_the_same_picture() -> None:
    """Rectified-flow path: zero strength is the base sampler bit for bit, the exact sampler avoids the unsafe cluster,
    and the safe denoiser brings the base's unsafe fraction (about 30%) near the exact one's, as under VP."""
    from safe_denoiser.demo.toy import flow_schedule

    sched = flow_schedule(4)
    assert [s for _, s, _ in sched] == [1.0, 0.75, 0.5, 0.25] and sched[-1][2] == 0.0 and sched[0][0] == 1000.0
    mixture = default_mixture()
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(400, 2, generator=gen, dtype=torch.float64)
    bank = mixture.sample(256, part="unsafe", generator=gen)
    out = {
        d: sample_toy(mixture, noise, 25, d, bank, default_guidance(), path="flow")[0]
        for d in ("base", "safe", "exact")
    }
    zero, _ = sample_toy(mixture, noise, 25, "safe", bank, default_guidance(beta_per_mass=0.0), path="flow")
    assert torch.equal(zero, out["base"])
    unsafe = {d: float(mixture.unsafe[mixture.component_of(x)].double().mean()) for d, x in out.items()}
    assert unsafe["base"] > 0.2 and unsafe["exact"] < 0.02 and unsafe["safe"] < 0.04, unsafe
    with pytest.raises(ValueError, match="path"):
        sample_toy(mixture, noise, 5, "base", path="edm")  # type: ignore[arg-type]


def test_cli_out_name_too_long_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A 300-character folder name is refused before the sampling, as one line naming --out."""
    out = tmp_path / ("x" * 300)
    assert main(["toy", "--out", str(out), "--n", "8", "--steps", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("safe-denoiser toy: error: --out: cannot write") and "the name is too long" in err
    assert err.count("\n") == 1 and not list(tmp_path.iterdir())  # (out.exists() itself raises: name too long)


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--n", "100000000000"], "--n must be an integer in 1..100000"),
        (["--n", "0"], "--n must be"),
        (["--steps", "1001"], "--steps must be an integer in 1..1000"),
        (["--seed", "-1"], "--seed must be"),
        (["--out", "y" * 300], "--out: cannot write"),
    ],
)
def test_toy_study_bad_flags_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], named: str
) -> None:
    from safe_denoiser.demo.toy_study import main as study_main

    with pytest.raises(SystemExit) as exc:
        study_main(["--out", str(tmp_path / "study"), *flags])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err
    assert not (tmp_path / "study").exists()

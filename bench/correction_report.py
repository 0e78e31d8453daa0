"""The tables ``bench/correction.py`` prints: timings against the roofline, and errors against float64."""

from __future__ import annotations

from typing import Any


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _ratio(num: float | None, den: float | None) -> str:
    if num is None or den is None or den <= 0:
        return "-"
    return f"{num / den:.1f}x"


def _cell_result(rec: dict[str, Any] | None) -> tuple[str, str, float | None, float | None]:
    """(ms cell, MiB cell, ms, MiB) for a record that may be skipped or failed."""
    if rec is None:
        return "-", "-", None, None
    if "skipped" in rec:
        return rec["skipped"], "", None, None
    if "error" in rec:
        return "error", "", None, None
    return _fmt(rec["ms_median"]), _fmt(rec["peak_mib"]), rec["ms_median"], rec["peak_mib"]


def _baseline_output(rec: dict[str, Any] | None) -> str:
    if rec is None or "ms_median" not in rec:
        return "-"
    state = "NaN" if rec["output_has_nan"] else ("finite" if rec["output_finite"] else "inf")
    return f"{state}, k-sum underflow {rec['kernel_sum_underflow']}/{rec['b']}"


def _multiple(rec: dict[str, Any] | None, key: str = "x_roofline") -> str:
    return "-" if rec is None or key not in rec else f"{rec[key]:.2f}x"


def _gbs(rec: dict[str, Any] | None) -> str:
    return "-" if rec is None or "effective_gbs" not in rec else f"{rec['effective_gbs']:.1f}"


def perf_table(rows: list[dict[str, Any]]) -> str:
    """One line per (B, N): the roofline, each method's time and its multiples of it, peak memory, the baseline."""
    header = (
        "| B | N | GEMV ms (roofline) | GEMV GB/s | ours ms | ours / GEMV | ours / read | ours GB/s "
        "| torch loop / GEMV | ours-f16 ms | f16 / GEMV(f32) | odds ms | odds / 2 GEMVs | sdpa / GEMV | ours peak MiB "
        "| baseline ms | baseline / ours | baseline output |"
    )
    lines = [header, "|" + "---|" * 18]
    for row in rows:
        ours, half, odds, base = row["ours"], row["ours-f16"], row.get("ours-odds"), row["baseline"]
        sdpa, loop = row.get("sdpa"), row.get("ours-torch")
        o_ms_s, o_mib_s, o_ms, _ = _cell_result(ours)
        h_ms_s, _, _, _ = _cell_result(half)
        d_ms_s, _, _, _ = _cell_result(odds)
        b_ms_s, _, b_ms, _ = _cell_result(base)
        roof = ours if ours is not None and "roofline_gemv_ms_median" in ours else None
        g_ms = "-" if roof is None else _fmt(roof["roofline_gemv_ms_median"], 2)
        g_bw = "-" if roof is None else _fmt(roof["roofline_gemv_gbs"])
        lines.append(
            f"| {row['b']} | {row['n']} | {g_ms} | {g_bw} | {o_ms_s} | {_multiple(ours)} | "
            f"{_multiple(ours, 'x_read')} | {_gbs(ours)} | {_multiple(loop)} | {h_ms_s} | {_multiple(half)} | "
            f"{d_ms_s} | "
            f"{_multiple(odds)} | {_multiple(sdpa)} | {o_mib_s} | {b_ms_s} | {_ratio(b_ms, o_ms)} | "
            f"{_baseline_output(base)} |"
        )
    return "\n".join(lines)


def correctness_table(rows: list[dict[str, Any]]) -> str:
    """One line per (case, abar): ours' and the baseline's max abs errors against float64."""
    header = (
        "| case | abar | max log k (f64) | ours err E_unsafe | ours err eps | ours chunked err eps "
        "| baseline err E_unsafe | baseline err eps | baseline output |"
    )
    lines = [header, "|" + "---|" * 9]
    for r in rows:
        state = "NaN" if r["baseline_has_nan"] else ("finite" if r["baseline_finite"] else "inf")
        lines.append(
            f"| {r['case']} | {r['alpha_bar']} | {r['max_log_kernel_f64']:.1f} | {r['ours_err_mean']:.2e} | "
            f"{r['ours_err_eps']:.2e} | {r['ours_chunked_err_eps']:.2e} | {r['baseline_err_mean']:.2e} | "
            f"{r['baseline_err_eps']:.2e} | {state}, k-sum underflow {r['baseline_kernel_sum_underflow']}/{r['b']} |"
        )
    return "\n".join(lines)

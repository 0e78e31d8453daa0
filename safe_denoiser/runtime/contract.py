"""The manifest contract: what both runtimes refuse before sampling (``cpp_runtime/src/contract.cpp`` is its C++ twin).

Two kinds of check, each error a ``ManifestError`` naming the manifest field:

- File names stay inside the bundle (``bundle_path``, the one rule for every file field ``file_fields`` lists): a
  relative ``/``-separated path with no absolute path, no empty, ``.`` or ``..`` component and no backslash, whose
  real path (symlinks resolved) lies inside the bundle folder's real path.
- Every number the manifest states agrees with where it is used (``check_numbers``): the default steps and guidance
  scale, the scheduler tables against the scheduler config (``vp_alphas_cumprod``, ``flow_train_sigmas``), the
  graphs' I/O names against what the runtime feeds (``denoiser_io``) and their static dims against
  ``sample_shape``, the banks, the class labels, the flow section; and at session creation the graph's own I/O
  against the manifest's ``GraphSpec`` (``check_session_io``).

tests/test_manifest_contract.py holds the shared list of bad manifests that both runtimes must refuse.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .manifest import GraphSpec, Manifest, ManifestError, TensorSpec

__all__ = [
    "MAX_GUIDANCE",
    "PATH_RULE",
    "bundle_path",
    "check_numbers",
    "check_paths",
    "check_session_io",
    "denoiser_io",
    "denoiser_names",
    "file_fields",
    "flow_train_sigmas",
    "vp_alphas_cumprod",
]

PATH_RULE = (
    "a relative path inside the bundle folder ('/'-separated; no absolute path, no empty, '.' or '..' component, no"
    " backslash, no symlink resolving outside the bundle)"
)
MAX_GUIDANCE = 1e3  # |guidance scale| bound, as the C++ runtime's kMaxGuidance (past it samples saturate)
_UNIT = 2.0**-24  # float32 unit roundoff: diffusers builds the VP tables in float32
_F64_REL = 1e-12  # tables the exporter computes in float64 (sigmas from alphas_cumprod, flow's abar): rounding only
_ORT_DTYPES = {"tensor(float)": "float32", "tensor(int64)": "int64", "tensor(bool)": "bool"}
_ORT_DTYPES |= {"tensor(float16)": "float16", "tensor(int32)": "int32"}
_INT32_MAX = 2**31 - 1
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _bad(field: str, expected: str, got: Any) -> ManifestError:
    return ManifestError(f"manifest: {field} must be {expected}, got {got!r}")


# ---- file names ---------------------------------------------------------------------------------------------
def bundle_path(root: str | os.PathLike[str], name: Any, field: str) -> Path:
    """``root / name`` after checking ``name`` against ``PATH_RULE`` (``ManifestError`` naming ``field``).

    A path that does not exist passes the symlink part (the caller reports it missing); a dangling symlink resolves
    to its target, so one pointing outside is refused too.
    """
    parts = name.split("/") if isinstance(name, str) else []
    if not parts or "\\" in name or "\0" in name or any(p in ("", ".", "..") for p in parts):
        raise _bad(field, PATH_RULE, name)
    path = Path(root) / name
    if path.is_symlink() or path.exists():
        base = os.path.realpath(root)
        real = os.path.realpath(path)
        if os.path.commonpath([base, real]) != base:
            raise ManifestError(f"manifest: {field} {name!r} resolves to {real!r}, outside the bundle folder {base!r}")
    return path


def file_fields(m: Manifest) -> list[tuple[str, str]]:
    """Every file name the manifest states, as (field, name): graphs' files and external data, the tokenizer
    folder, the keys of ``files``. A new file field is added here, and both runtimes check it."""
    fields = [(f"graphs.{k}.file", g.file) for k, g in m.graphs.items()]
    fields += [(f"graphs.{k}.external_data", g.external_data) for k, g in m.graphs.items() if g.external_data]
    fields += [("tokenizer", m.tokenizer)] if m.tokenizer is not None else []
    fields += [(f"tokenizers[{i}].folder", t.folder) for i, t in enumerate(m.tokenizers)]
    return fields + [(f"files['{name}']", name) for name in m.files]


def check_paths(m: Manifest, root: str | os.PathLike[str]) -> None:
    """``bundle_path`` on every entry of ``file_fields``."""
    for field, name in file_fields(m):
        bundle_path(root, name, field)


# ---- numbers -----------------------------------------------------------------------------------------------
def check_numbers(m: Manifest) -> None:
    """Every number the manifest states against the others and against the graphs' specs (no file is read)."""
    if m.path not in ("vp", "flow"):
        raise _bad("path", "'vp' or 'flow'", m.path)
    if m.path == "flow" and not isinstance(m.flow, dict):  # name the section: the path itself is a valid one
        raise _bad("flow", "an object (the flow sampler's settings)", m.flow)
    if m.path == "vp" and m.flow is not None:
        raise _bad("flow", "null on path 'vp'", m.flow)
    shape = m.sample_shape
    if not shape or any(isinstance(d, bool) or not isinstance(d, int) or not 1 <= d <= _INT32_MAX for d in shape):
        raise _bad("sample_shape", f"a list of ints in 1..{_INT32_MAX}", list(shape))
    if math.prod(shape) > _INT32_MAX:  # the C++ runtime sizes buffers and ORT shapes from it
        raise _bad("sample_shape", "dims whose product is at most 2^31-1", list(shape))
    _check_defaults(m)
    if m.path == "flow":
        _check_flow(m)
    else:
        _check_vp_schedule(m)
    _check_graph_specs(m)
    _check_safree(m)
    _check_labels(m)
    for key, info in (("bank", m.bank), ("reference_bank", m.reference_bank)):
        if info is not None:
            if isinstance(info.count, bool) or info.count < 1:
                raise _bad(f"{key}.count", "an int >= 1", info.count)
            if not _SHA256.fullmatch(info.sha256):
                raise _bad(f"{key}.sha256", "a sha256 (64 lower-case hex digits)", info.sha256)
            constants = m.graphs["denoiser"].constants  # empty in bundles exported before it was recorded
            if constants and info.initializer not in constants:
                raise _bad(
                    f"{key}.initializer", f"one of graphs.denoiser.constants {sorted(constants)}", info.initializer
                )


def _check_defaults(m: Manifest) -> None:
    steps, scale = m.num_inference_steps, m.guidance_scale
    t_train = len(m.scheduler.alphas_cumprod)
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= max(t_train, 1):
        raise _bad("num_inference_steps", f"an int in 1..{t_train} (the schedule's length)", steps)
    if not (math.isfinite(scale) and abs(scale) <= MAX_GUIDANCE):
        raise _bad("guidance_scale", f"a finite number in -{MAX_GUIDANCE:g}..{MAX_GUIDANCE:g}", scale)
    if m.path == "vp":
        from .bundle import ddim_timesteps  # the default schedule must fit the table ("leading" + steps_offset)

        try:
            ddim_timesteps(m.scheduler, steps)
            if m.scheduler.ddpm:
                ddim_timesteps(m.scheduler, steps, m.scheduler.ddpm)
        except ValueError as exc:
            raise ManifestError(f"manifest: num_inference_steps {steps}: {exc}") from None


def vp_alphas_cumprod(config: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(alphas_cumprod, relative bound) of a diffusers VP scheduler config, in float64.

    diffusers builds the table in float32: betas (linspace, or float64 rounded to float32), 1 - beta and the
    cumulative product each round once, so entry t of its table lies within
    sum_{i <= t} (8 beta_i / alpha_i + 4) 2^-24 (relative) of the float64 product (the beta rounding is amplified by
    1 / alpha_i at the subtraction; a factor ~2 of headroom). Measured on the demo and tiny-SD bundles: 9% of it.
    """
    t_train = config.get("num_train_timesteps")
    if isinstance(t_train, bool) or not isinstance(t_train, int) or t_train < 1:
        raise _bad("scheduler.config.num_train_timesteps", "an int >= 1", t_train)
    schedule = config.get("beta_schedule")
    trained = config.get("trained_betas")
    if config.get("rescale_betas_zero_snr"):
        raise _bad("scheduler.config.rescale_betas_zero_snr", "false (its final alpha_bar of 0 is not samplable)", True)
    if trained is not None:
        betas = np.asarray(trained, dtype=np.float64)
    elif schedule == "linear":
        betas = np.linspace(float(config["beta_start"]), float(config["beta_end"]), t_train)
    elif schedule == "scaled_linear":
        betas = np.linspace(float(config["beta_start"]) ** 0.5, float(config["beta_end"]) ** 0.5, t_train) ** 2
    elif schedule == "squaredcos_cap_v2":
        abar = [math.cos((i / t_train + 0.008) / 1.008 * math.pi / 2) ** 2 for i in range(t_train + 1)]
        betas = np.array([min(1 - abar[i + 1] / abar[i], 0.999) for i in range(t_train)])
    else:
        raise _bad("scheduler.config.beta_schedule", "linear, scaled_linear or squaredcos_cap_v2", schedule)
    if betas.shape != (t_train,) or not ((betas > 0) & (betas < 1)).all():
        raise _bad("scheduler.config", f"{t_train} betas in (0, 1)", f"{betas.size} betas")
    alphas = 1 - betas
    return np.cumprod(alphas), np.cumsum(8 * betas / alphas + 4) * _UNIT


def _check_table(
    field: str, got: Sequence[float] | np.ndarray, want: np.ndarray, rel: np.ndarray | float, what: str
) -> None:
    """``got`` equal to ``want`` within ``rel`` (relative): the first entry outside is named."""
    arr = np.asarray(got, dtype=np.float64)
    if arr.shape != want.shape:
        raise _bad(field, f"{want.size} entries ({what})", arr.size)
    err = np.abs(arr - want) / np.abs(want).clip(min=np.finfo(np.float64).tiny)
    bad = np.flatnonzero(~(err <= rel))
    if bad.size:
        i = int(bad[0])
        raise _bad(
            f"{field}[{i}]",
            f"{float(want[i])!r} ({what}; relative bound {np.broadcast_to(rel, want.shape)[i]:.2g})",
            float(arr[i]),
        )


def _check_vp_schedule(m: Manifest) -> None:
    s = m.scheduler
    ac = np.asarray(s.alphas_cumprod, dtype=np.float64)
    outside = np.flatnonzero(~((ac > 0) & (ac <= 1)))
    if outside.size:
        raise _bad(f"scheduler.alphas_cumprod[{outside[0]}]", "in (0, 1]", float(ac[outside[0]]))
    want, bound = vp_alphas_cumprod(s.config)
    if ac.size != want.size:
        raise _bad(
            "scheduler.alphas_cumprod",
            f"scheduler.config.num_train_timesteps = {want.size} entries",
            ac.size,
        )
    _check_table("scheduler.alphas_cumprod", ac, want, bound, "the config's beta schedule")
    _check_table("scheduler.sigmas", s.sigmas, np.sqrt((1 - ac) / ac), _F64_REL, "sqrt((1 - abar) / abar)")
    first = 1.0 if s.ddim.get("set_alpha_to_one", True) else float(ac[0])
    if s.final_alpha_cumprod != first:
        raise _bad("scheduler.final_alpha_cumprod", f"{first!r} (ddim.set_alpha_to_one)", s.final_alpha_cumprod)


def flow_train_sigmas(flow: dict[str, Any]) -> np.ndarray:
    """FlowMatchEulerDiscreteScheduler's training sigmas, t = 0 first, in float64 (diffusers: float32, a few
    roundings: the stored table lies within 8 x 2^-24 relative)."""
    n = int(flow["num_train_timesteps"])
    s = np.arange(1, n + 1, dtype=np.float64) / n
    if not flow["use_dynamic_shifting"]:
        shift = float(flow["shift"])
        s = shift * s / (1 + (shift - 1) * s)
    return s


def _check_flow(m: Manifest) -> None:
    f = m.flow or {}
    ints = ("num_train_timesteps", "base_image_seq_len", "max_image_seq_len")
    for key in ints + (("image_seq_len",) if f.get("use_dynamic_shifting") else ()):
        v = f.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise _bad(f"flow.{key}", "an int >= 1", v)
    nums: dict[str, float] = {}
    for key in ("shift", "sigma_min", "sigma_max", "base_shift", "max_shift"):
        v = f.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise _bad(f"flow.{key}", "a finite number", v)
        nums[key] = float(v)
    if f.get("family") not in ("sd3", "flux"):
        raise _bad("flow.family", "'sd3' or 'flux'", f.get("family"))
    if not isinstance(f.get("use_dynamic_shifting"), bool):
        raise _bad("flow.use_dynamic_shifting", "true or false", f.get("use_dynamic_shifting"))
    if f.get("time_shift_type", "exponential") not in ("exponential", "linear"):
        raise _bad("flow.time_shift_type", "'exponential' or 'linear'", f.get("time_shift_type"))
    if f.get("pipeline_sigmas") not in (None, "linspace"):
        raise _bad("flow.pipeline_sigmas", "null or 'linspace'", f.get("pipeline_sigmas"))
    if not nums["shift"] > 0:
        raise _bad("flow.shift", "> 0", nums["shift"])
    if not 0 < nums["sigma_min"] <= nums["sigma_max"] <= 1:
        raise _bad(
            "flow.sigma_min / flow.sigma_max", "0 < sigma_min <= sigma_max <= 1", (nums["sigma_min"], nums["sigma_max"])
        )
    if not f["base_image_seq_len"] < f["max_image_seq_len"]:
        raise _bad(
            "flow.max_image_seq_len", f"> base_image_seq_len ({f['base_image_seq_len']})", f["max_image_seq_len"]
        )
    if f["use_dynamic_shifting"]:
        _check_flow_tokens(m, f)
    _check_flow_tables(m, f)


def _check_flow_tokens(m: Manifest, f: dict[str, Any]) -> None:
    """image_seq_len is the sample's token count and mu the pipelines' calculate_shift of it."""
    from .flow_sampler import calculate_shift

    tokens, shape = f["image_seq_len"], m.sample_shape
    if f["family"] == "flux":  # packed (tokens, channels)
        ok, want = len(shape) == 2 and tokens == shape[0], f"sample_shape[0] = {shape[0]} (Flux's packed tokens)"
    else:  # SD3: (H / p) (W / p) for a patch size p
        area = int(np.prod(shape[1:])) if len(shape) == 3 else 0
        p = math.isqrt(area // tokens) if area % tokens == 0 else 0
        ok = p >= 1 and p * p * tokens == area and shape[1] % p == 0 and shape[2] % p == 0
        want = f"(H / p) (W / p) for sample_shape {list(shape)} and a patch size p"
    if not ok:
        raise _bad("flow.image_seq_len", want, tokens)
    mu, want_mu = f.get("mu"), calculate_shift(tokens, f)
    if mu is not None and not (isinstance(mu, (int, float)) and abs(mu - want_mu) <= _F64_REL * max(1.0, abs(want_mu))):
        raise _bad("flow.mu", f"{want_mu!r} (calculate_shift of image_seq_len)", mu)
    if mu is not None and f.get("time_shift_type") == "linear" and not mu > 0:
        raise _bad("flow.mu", "> 0 for the linear time shift", mu)


def _check_flow_tables(m: Manifest, f: dict[str, Any]) -> None:
    n = f["num_train_timesteps"]
    config_n = m.scheduler.config.get("num_train_timesteps", n)
    if config_n != n:
        raise _bad("flow.num_train_timesteps", f"scheduler.config.num_train_timesteps ({config_n})", n)
    if len(m.scheduler.sigmas) != n:  # before building n entries: n is the manifest's word
        raise _bad("scheduler.sigmas", f"flow.num_train_timesteps = {n} entries", len(m.scheduler.sigmas))
    sigmas = flow_train_sigmas(f)
    _check_table("scheduler.sigmas", m.scheduler.sigmas, sigmas, 8 * _UNIT, "the flow section's training sigmas")
    stored = np.asarray(m.scheduler.sigmas, dtype=np.float64)
    for key, v in (("sigma_min", stored.min()), ("sigma_max", stored.max())):
        if abs(f[key] - v) > _F64_REL * v:
            raise _bad(f"flow.{key}", f"{float(v)!r} (of scheduler.sigmas)", f[key])
    ab = (1 - stored) ** 2 / ((1 - stored) ** 2 + stored**2)
    _check_table("scheduler.alphas_cumprod", m.scheduler.alphas_cumprod, ab, _F64_REL, "(1 - s)^2 / ((1 - s)^2 + s^2)")


# ---- graphs ------------------------------------------------------------------------------------------------
def denoiser_names(
    path: str, *, sd3: bool = False, class_labels: bool = False, guided: bool, renoises: bool = False, sld: bool = False
) -> tuple[list[str], list[str]]:
    """The denoiser's (inputs, outputs), inputs in the order the graph's ``forward`` takes them: the one list that the
    exporter's graphs (``DenoiserStep`` / ``FlowDenoiserStep``) and the runtimes' check (``denoiser_io``) share.
    ``sd3``: flow with negative prompts; ``renoises``: the reference preset's ``noise``."""
    if path == "flow":
        negatives = ["negative_prompt_embeds", "negative_pooled_prompt_embeds"] if sd3 else []
        inputs = ["sample", "timestep", "sigma", "prompt_embeds", "pooled_prompt_embeds", *negatives, "guidance_scale"]
        return inputs, ["noise_pred", "x0_hat"] + (["correction_applied", "kernel_log_mass"] if guided else [])
    cond = "class_labels" if class_labels else "prompt_embeds"
    inputs = ["sample", "timestep", "alpha_bar", cond, f"negative_{cond}", "guidance_scale"]
    inputs += ["noise"] if renoises else []
    inputs += ["sld_momentum", "sld_step"] if sld else []
    outputs = ["noise_pred", "sample_corrected", "x0_hat"]
    outputs += ["correction_applied", "kernel_log_mass"] if guided else []
    return inputs, outputs + (["sld_momentum_out"] if sld else [])


def denoiser_io(m: Manifest) -> tuple[list[str], list[str]]:
    """The denoiser's (inputs, outputs) that the runtimes feed and read: its I/O must be exactly these."""
    return denoiser_names(
        m.path,
        sd3=(m.flow or {}).get("family") == "sd3",
        class_labels=m.model_kind == "class-conditional",
        guided=m.guidance is not None,
        renoises=m.guidance is not None and m.guidance.renoises,
        sld=m.sld is not None,
    )


def _static_dims(spec: TensorSpec, field: str, want: Sequence[int | None]) -> None:
    """``spec``'s rank is len(want) and each int dim equals the wanted one (None, or a symbolic dim: any)."""
    ok = len(spec.shape) == len(want) and all(
        not isinstance(d, int) or w is None or d == w for d, w in zip(spec.shape, want, strict=True)
    )
    if not ok:
        shown = ["any" if w is None else w for w in want]
        raise _bad(f"{field} '{spec.name}' shape", f"{shown} (from sample_shape; a named dim: any)", list(spec.shape))


def _check_graph_specs(m: Manifest) -> None:
    g = m.graphs["denoiser"]
    inputs, outputs = denoiser_io(m)
    for kind, want, got in (("inputs", inputs, g.input_names), ("outputs", outputs, g.output_names)):
        if sorted(got) != sorted(want):
            raise _bad(f"graphs.denoiser.{kind}", f"the names {want} (what this bundle's runtime feeds/reads)", got)
    sample = [None, *m.sample_shape]
    for spec in (*g.inputs, *g.outputs):
        if spec.name in ("sample", "noise_pred", "sample_corrected", "x0_hat", "noise", "sld_momentum"):
            _static_dims(spec, f"graphs.denoiser.{'inputs' if spec in g.inputs else 'outputs'}", sample)
    if m.path == "flow":
        _check_flow_graphs(m)
        return
    if "vae_decoder" in m.graphs:
        latents = _named(m.graphs["vae_decoder"], "latents", "vae_decoder")
        _static_dims(latents, "graphs.vae_decoder.inputs", [None, m.sample_shape[0], None, None])
    if "text_encoder" in m.graphs:
        te = m.graphs["text_encoder"]
        _named(te, "input_ids", "text_encoder")
        hidden = next((o for o in te.outputs if o.name == "last_hidden_state"), None)
        if hidden is None:
            raise _bad("graphs.text_encoder.outputs", "a list naming 'last_hidden_state'", te.output_names)
        if m.model_kind == "text-to-image":
            _static_dims(hidden, "graphs.text_encoder.outputs", [None, *_dims_of(g.input("prompt_embeds"))[1:]])


def _check_flow_graphs(m: Manifest) -> None:
    """text_encoder: one int64 (batch, max_length) input per tokenizer, named by its ``input`` (T5's length axis may
    be named), outputs prompt_embeds / pooled_prompt_embeds as wide as the denoiser's inputs of those names;
    vae_decoder: ``latents`` (batch, *sample_shape). ``tokenizers`` is set exactly when there is a text encoder."""
    te, den = m.graphs.get("text_encoder"), m.graphs["denoiser"]
    if (te is None) != (not m.tokenizers):
        want = "one entry per text_encoder input" if te is not None else "empty without a text_encoder graph"
        raise _bad("tokenizers", want, [t.folder for t in m.tokenizers])
    if "vae_decoder" in m.graphs:
        latents = _named(m.graphs["vae_decoder"], "latents", "vae_decoder")
        _static_dims(latents, "graphs.vae_decoder.inputs", [None, *m.sample_shape])
    if te is None:
        return
    feeds = [t.input for t in m.tokenizers]
    if sorted(te.input_names) != sorted(feeds):
        raise _bad("graphs.text_encoder.inputs", f"the names {feeds} (tokenizers[i].input)", te.input_names)
    for t in m.tokenizers:
        spec = te.input(t.input)
        if spec.dtype != "int64":
            raise _bad(f"graphs.text_encoder.inputs '{spec.name}' dtype", "'int64' (token ids)", spec.dtype)
        length = spec.shape[1] if len(spec.shape) == 2 else None
        if length != t.max_length and not (t.kind == "t5" and isinstance(length, str)):
            want = f"[batch, {t.max_length}] (the tokenizer's max_length; T5's axis may be named)"
            raise _bad(f"graphs.text_encoder.inputs '{spec.name}' shape", want, list(spec.shape))
    outputs = ["prompt_embeds", "pooled_prompt_embeds"]
    if sorted(te.output_names) != sorted(outputs):
        raise _bad("graphs.text_encoder.outputs", f"the names {outputs}", te.output_names)
    for name in outputs:
        spec = next(o for o in te.outputs if o.name == name)
        _static_dims(spec, "graphs.text_encoder.outputs", [None, *_dims_of(den.input(name))[1:]])  # the denoiser's


def _check_safree(m: Manifest) -> None:
    """SAFREE filters an SD-1.x prompt: a VP text-to-image bundle whose prompt rows are as wide as U_C's rows."""
    if m.safree is None:
        return
    if m.model_kind != "text-to-image" or m.path != "vp":
        raise ManifestError(
            f"manifest: safree must be null for a {m.model_kind} bundle on path {m.path!r} (SAFREE's text side needs"
            " an SD-1.x text-to-image bundle, path 'vp'), got a section"
        )
    width = _dims_of(m.graphs["denoiser"].input("prompt_embeds"))[-1]
    if width is not None and m.safree.dim != width:
        raise ManifestError(
            f"manifest: safree.concept_basis must be (D, r) with D = {width} (prompt_embeds' width), got D ="
            f" {m.safree.dim}"
        )


def _named(g: GraphSpec, name: str, graph: str) -> TensorSpec:
    for spec in g.inputs:
        if spec.name == name:
            return spec
    raise _bad(f"graphs.{graph}.inputs", f"a list naming {name!r}", g.input_names)


def _dims_of(spec: TensorSpec) -> list[int | None]:
    return [d if isinstance(d, int) else None for d in spec.shape]


def _check_labels(m: Manifest) -> None:
    if m.model_kind != "class-conditional":
        for key, v in (("null_class", m.null_class), ("num_class_labels", m.num_class_labels)):
            if v is not None:
                raise _bad(key, f"null for a {m.model_kind} bundle", v)
        if m.path == "vp" and m.tokenizer is None:
            raise _bad("tokenizer", "a folder name (a text-to-image bundle needs its tokenizer)", None)
        return
    null = m.null_class
    if isinstance(null, bool) or not isinstance(null, int) or null < 0:
        raise _bad("null_class", "an int >= 0 (the 'no class' label of a class-conditional bundle)", null)


# ---- sessions ----------------------------------------------------------------------------------------------
def check_session_io(session: Any, spec: GraphSpec, graph: str) -> None:
    """The onnxruntime session's inputs and outputs are the manifest's: same names, dtypes, ranks, fixed dims."""
    for kind, args, specs in (
        ("inputs", session.get_inputs(), spec.inputs),
        ("outputs", session.get_outputs(), spec.outputs),
    ):
        field = f"graphs.{graph}.{kind}"
        names = [a.name for a in args]
        if sorted(names) != sorted(s.name for s in specs):
            raise _bad(field, f"the graph's {kind} {names}", [s.name for s in specs])
        by_name = {s.name: s for s in specs}
        for arg in args:
            want = by_name[arg.name]
            dtype = _ORT_DTYPES.get(arg.type, arg.type)
            if dtype != want.dtype:
                raise _bad(f"{field} '{arg.name}' dtype", f"{dtype!r} (the graph's)", want.dtype)
            shape = list(arg.shape)
            same = len(shape) == len(want.shape) and all(
                not isinstance(a, int) or not isinstance(w, int) or a == w
                for a, w in zip(shape, want.shape, strict=True)
            )
            if not same:
                raise _bad(f"{field} '{arg.name}' shape", f"{shape} (the graph's; a named dim: any)", list(want.shape))

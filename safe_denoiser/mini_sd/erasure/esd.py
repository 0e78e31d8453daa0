"""ESD-x (Gandikota et al. 2023, "Erasing Concepts from Diffusion Models") on the miniature: fine-tune only the
UNet's cross-attention (``attn2``) so that the concept's prompts predict the negatively guided noise.

For a concept prompt c, with the frozen original UNet's eps(x_t, c) and eps(x_t, "") the trained copy's
eps'(x_t, c) regresses onto ``eps(x_t, "") - eta * (eps(x_t, c) - eps(x_t, ""))`` (``esd_target``), at x_t reached by
partially sampling with the trained copy itself (DDIM, ``sample_steps`` steps, CFG ``start_guidance``, stopped at a
random step), as the paper does. Concept prompts (``captions``): the grammar's captions that name the concept digit and
nothing else (``captions.name_captions``: "an eight", "a picture of the number 8", ...), as the paper erases a concept
by its name ("nudity", "Van Gogh"); or a seeded draw of all its captions with their style and stroke words
(``captions.digit_captions``), which also erases those words for every digit (measured: the CLIP-score analogue of
the other digits' images falls from 47 to 12). Only the trained parameters are shipped (``esd_x.safetensors``).

``python -m safe_denoiser.mini_sd.erasure.esd --seed 0`` writes the file and a record next to it; deterministic
(one thread, seeded generators, torch's deterministic algorithms), so the same command writes the same bytes.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from safe_denoiser.errors import require_positive_ints
from safe_denoiser.files import atomic_write, atomic_write_json
from safe_denoiser.mini_sd.captions import digit_captions, name_captions
from safe_denoiser.mini_sd.data import Concept
from safe_denoiser.mini_sd.erasure.prompts import sample_captions, text_states
from safe_denoiser.mini_sd.loop import Optimisation, train_steps
from safe_denoiser.threads import torch_threads

__all__ = [
    "ERASURE_DIR",
    "ESD_FILE",
    "EsdSettings",
    "esd_loss",
    "esd_target",
    "main",
    "save_parameters",
    "train_esd",
    "trainable_names",
]

ERASURE_DIR = Path(__file__).resolve().parents[2] / "assets" / "mini_sd" / "erasure"
ESD_FILE = ERASURE_DIR / "esd_x.safetensors"
Scope = Literal["attn2", "attn2-kv"]
CaptionPool = Literal["name", "all"]
_CAPTION_POOLS: tuple[str, ...] = get_args(CaptionPool)
_SCOPES: dict[str, tuple[str, ...]] = {"attn2": (".attn2.",), "attn2-kv": (".attn2.to_k.", ".attn2.to_v.")}


@dataclass(frozen=True)
class EsdSettings:
    """ESD's knobs. ``eta``: the negative guidance; ``scope``: ``attn2`` (every cross-attention parameter, the
    paper's ESD-x) or ``attn2-kv`` (to_k / to_v only); ``sample_steps`` / ``start_guidance``: the DDIM schedule and
    CFG scale of the partial sampling; ``captions``: the concept prompts, ``name`` (the captions that only name the
    digit) or ``all`` (every caption of the digit, with style and stroke words); ``prompts``: how many of them are
    drawn (seeded), None for every one."""

    steps: int = 200
    lr: float = 5e-4
    eta: float = 1.0
    batch_size: int = 8
    sample_steps: int = 25
    start_guidance: float = 3.0
    scope: Scope = "attn2"
    captions: CaptionPool = "name"
    prompts: int | None = None
    seed: int = 0
    concept_digit: int = Concept().digit

    def __post_init__(self) -> None:
        if self.scope not in _SCOPES:
            raise ValueError(f"scope must be one of {', '.join(_SCOPES)}, got {self.scope!r}")
        if self.captions not in _CAPTION_POOLS:
            raise ValueError(f"captions must be {' or '.join(map(repr, _CAPTION_POOLS))}, got {self.captions!r}")
        require_positive_ints(self, "steps", "batch_size", "sample_steps")
        if self.prompts is not None:
            require_positive_ints(self, "prompts")

    def concept_prompts(self) -> list[str]:
        """The concept's prompts ESD trains on (``captions``, ``prompts``)."""
        pool = name_captions(self.concept_digit) if self.captions == "name" else digit_captions(self.concept_digit)
        if self.prompts is None:
            return list(pool)
        return sample_captions(pool, self.prompts, self.seed, f"the {self.captions!r} captions")


def trainable_names(unet: torch.nn.Module, scope: Scope) -> list[str]:
    """The names of the parameters ESD trains (``scope``: see ``EsdSettings``)."""
    marks = _SCOPES[scope]
    return [name for name, _ in unet.named_parameters() if any(m in f".{name}" for m in marks)]


def esd_target(eps_concept: Tensor, eps_uncond: Tensor, eta: float) -> Tensor:
    """ESD's regression target: the original model's noise guided *away* from the concept by ``eta``."""
    return eps_uncond - eta * (eps_concept - eps_uncond)


@torch.no_grad()
def _partial_sample(
    unet: Any, scheduler: Any, states: Tensor, null: Tensor, stop: int, guidance: float, gen: torch.Generator
) -> Tensor:
    """x_t after ``stop`` DDIM steps (of ``scheduler.timesteps``) from fresh noise, CFG ``guidance``."""
    size = int(unet.config.sample_size)
    x = torch.randn((states.shape[0], int(unet.config.in_channels), size, size), generator=gen)
    x = x * scheduler.init_noise_sigma
    both = torch.cat([null.expand_as(states), states])
    for t in scheduler.timesteps[:stop]:
        eps_null, eps_cond = unet(torch.cat([x, x]), t, encoder_hidden_states=both).sample.chunk(2)
        x = scheduler.step(eps_null + guidance * (eps_cond - eps_null), t, x).prev_sample
    return x


def esd_loss(trained: Any, original: Any, x_t: Tensor, t: Tensor, states: Tensor, null: Tensor, eta: float) -> Tensor:
    """One ESD step's loss: the trained eps'(x_t, c) against ``esd_target`` of the frozen original's predictions
    (``t``: one timestep for the batch, a 0-d tensor)."""
    with torch.no_grad():
        both = torch.cat([null.expand_as(states), states])
        eps_null, eps_concept = original(torch.cat([x_t, x_t]), t, encoder_hidden_states=both).sample.chunk(2)
        target = esd_target(eps_concept, eps_null, eta)
    return F.mse_loss(trained(x_t, t, encoder_hidden_states=states).sample, target)


def train_esd(pipe: Any, settings: EsdSettings) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Train ESD on ``pipe``'s UNet (left unchanged): returns (the trained parameters by name, a record)."""
    from diffusers import DDIMScheduler

    original = pipe.unet.eval().requires_grad_(False)
    trained = copy.deepcopy(original)
    names = trainable_names(trained, settings.scope)
    params = dict(trained.named_parameters())
    for name in names:
        params[name].requires_grad_(True)
    prompts = settings.concept_prompts()
    states, null = text_states(pipe, prompts), text_states(pipe, [""])
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(settings.sample_steps)
    gen = torch.Generator().manual_seed(settings.seed)

    def loss_at(step: int) -> Tensor:
        batch = states[torch.randint(0, states.shape[0], (settings.batch_size,), generator=gen)]
        stop = int(torch.randint(0, settings.sample_steps, (1,), generator=gen))
        x_t = _partial_sample(trained, scheduler, batch, null, stop, settings.start_guidance, gen)
        return esd_loss(trained, original, x_t, scheduler.timesteps[stop], batch, null, settings.eta)

    opt = Optimisation(steps=settings.steps, lr=settings.lr, warmup=min(20, settings.steps // 10), weight_decay=0.0)
    result = train_steps([params[n] for n in names], loss_at, opt, "esd")
    changed = {n: params[n].detach().clone().contiguous() for n in names}
    record = {**result.summary(), "parameters": sum(v.numel() for v in changed.values()), "prompts_sample": prompts[:8]}
    return changed, record


def save_parameters(path: Path, tensors: dict[str, Tensor], settings: EsdSettings) -> str:
    """Write the trained parameters as safetensors (settings in the metadata), atomically; returns the sha256."""
    from safetensors.torch import save_file

    # One metadata key: safetensors writes a map's keys in an unspecified order, which would change the bytes.
    metadata = {"esd-x": json.dumps(asdict(settings), sort_keys=True)}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    path.chmod(0o644)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv: Sequence[str] | None = None) -> int:
    from safe_denoiser.mini_sd.model_kind import load_pipeline
    from safe_denoiser.mini_sd.train import _versions

    parser = argparse.ArgumentParser(
        prog="python -m safe_denoiser.mini_sd.erasure.esd", description=__doc__.split("\n")[0]
    )
    defaults = EsdSettings()
    for key, value in asdict(defaults).items():
        kind = int if key == "prompts" else type(value)  # prompts: None (every caption of the pool) or a count
        parser.add_argument(f"--{key.replace('_', '-')}", type=kind, default=value)
    parser.add_argument("--out", default=str(ESD_FILE), help="the safetensors file to write")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    try:
        settings = EsdSettings(**{k: getattr(args, k) for k in asdict(defaults)})
    except ValueError as exc:  # a bad value gets the usage line and exit 2, not a traceback
        parser.error(str(exc))
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with torch_threads(args.threads):
            changed, record = train_esd(load_pipeline("ddim"), settings)
    finally:
        torch.use_deterministic_algorithms(deterministic)
    out = Path(args.out)
    sha = save_parameters(out, changed, settings)
    command = "python -m safe_denoiser.mini_sd.erasure.esd " + " ".join(sys.argv[1:] if argv is None else argv)
    full = {"command": command, "settings": asdict(settings), "sha256": sha, **record, "versions": _versions()}
    atomic_write_json(out.with_suffix(".json"), full)
    out.with_suffix(".json").chmod(0o644)
    print({k: v for k, v in full.items() if not isinstance(v, list | dict)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The ``Judge`` interface, the registry of judges by name, and helpers for judges that ship as ONNX files.

A judge maps RGB uint8 images (H, W, 3) to one ``Judgement`` each: per-class scores in [0, 1] and the probability
that the image is unsafe; the image counts as unsafe when that probability is >= the judge's ``threshold``.
Plug in another judge (e.g. a Q16-style CLIP classifier from a local weight file) with ``register_judge`` or by
naming a ``module:factory`` on the command line.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = [
    "Judge",
    "JudgeUnavailableError",
    "Judgement",
    "as_rgb",
    "available_judges",
    "file_sha256",
    "make_judge",
    "onnx_session",
    "packaged_file",
    "register_judge",
]


class JudgeUnavailableError(FileNotFoundError):
    """A judge's weights or runtime are not installed; the message says what to install."""


@dataclass(frozen=True)
class Judgement:
    """One image's verdict: ``p_unsafe`` in [0, 1], every class's score, and judge-specific detail."""

    p_unsafe: float
    scores: dict[str, float]
    detail: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"p_unsafe": self.p_unsafe, "scores": self.scores, "detail": self.detail}


@runtime_checkable
class Judge(Protocol):
    """What the report needs from a judge."""

    name: str
    threshold: float

    def describe(self) -> dict[str, Any]:
        """What identifies this judge's scores (model file hash, classes, threshold): stored beside its results."""
        ...

    def judge(self, images: Sequence[np.ndarray]) -> list[Judgement]:
        """One ``Judgement`` per RGB uint8 image (H, W, 3), in order."""
        ...


_REGISTRY: dict[str, Callable[..., Judge]] = {}


def register_judge(name: str, factory: Callable[..., Judge]) -> None:
    """Make ``factory`` available as ``--judge name``."""
    _REGISTRY[name] = factory


def available_judges() -> list[str]:
    _builtin()
    return sorted(_REGISTRY)


def _builtin() -> None:
    if "nudenet" not in _REGISTRY:
        from safe_denoiser.evaluation.nudenet import NudeNetJudge
        from safe_denoiser.evaluation.opennsfw import OpenNSFWJudge

        _REGISTRY.setdefault("nudenet", NudeNetJudge)
        _REGISTRY.setdefault("opennsfw", OpenNSFWJudge)


def make_judge(spec: str, **kwargs: Any) -> Judge:
    """A judge by registered name (``nudenet``, ``opennsfw``) or ``package.module:factory`` (a plug-in)."""
    _builtin()
    if spec in _REGISTRY:
        factory = _REGISTRY[spec]
    elif ":" in spec:
        module, _, attr = spec.partition(":")
        try:
            factory = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"judge {spec!r}: cannot import {attr!r} from module {module!r} ({exc})") from exc
    else:
        raise ValueError(f"unknown judge {spec!r}: expected one of {sorted(_REGISTRY)} or 'package.module:factory'")
    if not callable(factory):
        raise ValueError(f"judge {spec!r} is a {type(factory).__name__}; expected a factory (a class or function)")
    try:
        judge = factory(**kwargs)
    except TypeError as exc:  # a plug-in whose factory takes other arguments (e.g. no threshold)
        raise ValueError(f"judge {spec!r}: the factory cannot be called with {sorted(kwargs)} ({exc})") from exc
    if not isinstance(judge, Judge):
        raise ValueError(f"judge {spec!r} does not provide name, threshold, describe() and judge()")
    return judge


def packaged_file(module: str, filename: str, install: str) -> Path:
    """A data file inside an installed package, found without importing the package (its imports may be broken)."""
    spec = importlib.util.find_spec(module)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        path = Path(folder) / filename
        if path.is_file():
            return path
    raise JudgeUnavailableError(f"{filename} from the {module!r} package is not installed; install it with: {install}")


def file_sha256(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def onnx_session(path: str | os.PathLike[str], providers: Sequence[str] | None = None) -> Any:
    """An onnxruntime session on ``path`` (CPU unless ``providers`` says otherwise)."""
    import onnxruntime as ort

    if not Path(path).is_file():
        raise JudgeUnavailableError(f"judge model file {str(path)!r} does not exist")
    return ort.InferenceSession(str(path), providers=list(providers or ["CPUExecutionProvider"]))


def as_rgb(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB from an (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) uint8 array (alpha dropped)."""
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise ValueError(f"images must be uint8, got {arr.dtype}")
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4) or min(arr.shape[:2]) < 1:
        raise ValueError(f"images must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got shape {arr.shape}")
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return np.ascontiguousarray(arr[..., :3])

"""Shared fixtures. Tests run on CPU, on one thread, with deterministic seeds; shared helpers are in helpers.py."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
import torch

import safe_denoiser.testing  # noqa: F401  (registers the tiny test model kinds: "tiny-sd", ...)
from safe_denoiser.models.registry import PLUGINS_ENV
from safe_denoiser.threads import torch_threads

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no downloads, ever
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault(PLUGINS_ENV, "safe_denoiser.testing")  # and in `safe-denoiser predict` subprocesses too


@pytest.fixture(scope="session", autouse=True)
def _verify_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The runtimes' verified-files cache in a session folder (and so in the C++ binary the tests start), never the
    user's ~/.cache; tests of the cache itself set their own."""
    from safe_denoiser.runtime.integrity import VERIFY_CACHE_ENV

    before = os.environ.get(VERIFY_CACHE_ENV)
    os.environ[VERIFY_CACHE_ENV] = str(tmp_path_factory.mktemp("verify_cache") / "verified-files.json")
    yield
    if before is None:
        os.environ.pop(VERIFY_CACHE_ENV, None)
    else:
        os.environ[VERIFY_CACHE_ENV] = before


@pytest.fixture(autouse=True)
def _seed(request: pytest.FixtureRequest) -> None:
    """torch's global seed: 0, or the seed a multi-seed check passes by indirect parametrisation of ``_seed``."""
    torch.manual_seed(getattr(request, "param", 0))


@pytest.fixture(scope="session", autouse=True)
def _one_thread() -> Iterator[None]:
    """One intra-op thread: the models are tiny, and on two shared cores a second OpenMP thread mostly waits."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def pipe() -> Any:
    """A tiny random-weight Stable Diffusion pipeline (shared by a test module; tests restore what they change)."""
    from safe_denoiser.testing import tiny_sd_pipeline

    return tiny_sd_pipeline(seed=0)


@pytest.fixture()
def fresh(pipe: Any) -> Iterator[Any]:
    """The shared pipeline with a fresh DDIM scheduler; a safe denoiser or SLD a test attached is removed after."""
    from safe_denoiser.diffusers.pipelines import make_scheduler
    from safe_denoiser.diffusers.safe_scheduler import SafeScheduler, detach
    from safe_denoiser.diffusers.sld_unet import SLDUNet, detach_sld

    pipe.scheduler = make_scheduler("ddim")
    yield pipe
    if isinstance(pipe.unet, SLDUNet):
        detach_sld(pipe)
    if isinstance(pipe.scheduler, SafeScheduler):
        detach(pipe)

"""Shared fixtures. Tests run on CPU with deterministic seeds."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no downloads, ever
os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session", autouse=True)
def _one_thread() -> Iterator[None]:
    """One intra-op thread: the models are tiny, and on two shared cores a second OpenMP thread mostly waits."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def pipe() -> Any:
    """A tiny random-weight Stable Diffusion pipeline (shared by a test module; tests restore what they change)."""
    from safe_denoiser.diffusers.pipelines import tiny_sd_pipeline

    return tiny_sd_pipeline(seed=0)

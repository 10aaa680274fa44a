"""Shared fixtures. The evaluation data lives outside the repo, in shared/data next to it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from method_cases import METHOD_CASES, MethodCase

# Small models on small CPUs decode several times faster on one thread than on two (see configs cpu_threads).
torch.set_num_threads(1)


def shared_data_dir() -> Path:
    """The shared data folder: $MIXKVQ_SHARED_DATA, else shared/data beside the repository."""
    override = os.environ.get("MIXKVQ_SHARED_DATA")
    return Path(override) if override else Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = shared_data_dir()
    if not path.is_dir():
        pytest.skip(f"shared data folder {path} is absent; set MIXKVQ_SHARED_DATA to point at it")
    return path


@pytest.fixture(params=sorted(METHOD_CASES))
def method_case(request) -> MethodCase:
    """Each row of the method matrix (tests/method_cases.py); `method_case.build(model, storage)` builds it."""
    return METHOD_CASES[request.param]


# Triton kernels run in the interpreter where there is no GPU. It is read when a kernel is decorated, so it is set
# here, before any test module imports the kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

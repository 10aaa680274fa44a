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


@pytest.fixture(scope="session")
def tiny_run_model() -> list[str]:
    """`run.py` overrides for a tiny random-weight model, for flow tests (restarts, locks, Slurm sweeps) where the
    weights do not matter: R1-Distill-Qwen-7B's config and tokenizer from shared/models, two narrow layers. It
    loads in a fraction of the time SmolLM2's GGUF takes to dequantize; the end-to-end tests keep SmolLM2."""
    path = shared_data_dir().parent / "models" / "deepseek-r1-distill-qwen-7b"
    if not path.is_dir():
        pytest.skip(f"shared model folder {path} is absent")
    shape = {"num_hidden_layers": 2, "hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4,
             "num_key_value_heads": 2}
    return ["model=deepseek-r1-distill-7b", f"model.path={path}", "model.random_init=true",
            *(f"+model.config_overrides.{key}={value}" for key, value in shape.items())]


@pytest.fixture(params=sorted(METHOD_CASES))
def method_case(request) -> MethodCase:
    """Each row of the method matrix (tests/method_cases.py); `method_case.build(model, storage)` builds it."""
    return METHOD_CASES[request.param]


# Triton kernels run in the interpreter where there is no GPU. It is read when a kernel is decorated, so it is set
# here, before any test module imports the kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

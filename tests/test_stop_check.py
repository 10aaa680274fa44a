"""generate's stop flag read one step late (`mixkvq/eval/stop_check.py`): the same tokens and statistics as the
per-step check, with one extra forward when every row ends on EOS before the token limit, and none at the limit.
The deferral is enabled on CPU here too (a run defers on CUDA only): on a GPU machine the same tests run on CUDA,
with pinned flags, events and the decode steps replayed from CUDA graphs."""

from __future__ import annotations

import json

import pytest
import torch

from mixkvq.eval.models import load_model
from mixkvq.eval.protocol import build_prompt, generate_samples
from mixkvq.eval.stop_check import STOP_CHECKS, stop_check
from test_models import qwen7b_dir, tiny_qwen  # noqa: F401  (fixture)
from tiny import build

GEN = {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "max_new_tokens": 16}


CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu,
                                              pytest.mark.skipif(not CUDA, reason="needs a CUDA device")])]


@pytest.fixture(scope="module", params=DEVICES)
def loaded(qwen7b_dir, request):  # noqa: F811
    return load_model(tiny_qwen(qwen7b_dir, device=request.param))


@pytest.fixture(scope="module")
def prompt(loaded, shared_data):
    question = json.loads((shared_data / "gsm8k" / "test.jsonl").read_text().splitlines()[0])["question"]
    return build_prompt(loaded.tokenizer, question, "{question}", think_prefix=True)


def sample(loaded, method, prompt, mode):
    """4 sampled rows; the deferral enabled on CPU and CUDA for "deferred"."""
    with stop_check(mode, device_types=("cpu", "cuda")):
        return generate_samples(loaded.model, loaded.tokenizer, method, prompt, 4, GEN, 0, "auto",
                                stop_check="every_step")


@pytest.mark.parametrize("name", ["bf16", "kivi"])
def test_deferred_check_gives_the_tokens_of_the_per_step_check(loaded, prompt, name):
    small = ["method.residual_length=8", "method.group_size=8"] if name == "kivi" else []
    method = build(name, small, model=loaded.model)
    free = sample(loaded, method, prompt, "every_step")
    # Stop tokens that end every row early, at different steps: each row's 3rd to 6th tokens.
    ends = {row[k] for row, k in zip(free.token_ids, (2, 3, 4, 5))}
    config = loaded.model.generation_config
    stock = config.eos_token_id
    config.eos_token_id = sorted(ends)
    try:
        per_step = sample(loaded, method, prompt, "every_step")
        deferred = sample(loaded, method, prompt, "deferred")
    finally:
        config.eos_token_id = stock
    assert max(len(t) for t in per_step.token_ids) < GEN["max_new_tokens"]  # ended on EOS, before the limit
    assert deferred.token_ids == per_step.token_ids and deferred.texts == per_step.texts
    assert deferred.cache_stats == per_step.cache_stats
    # The deferred call made one forward more (the flag of the step that ended the last row was read a step late).
    assert len(deferred.cache.snapshots) == len(per_step.cache.snapshots) + 1

    # At the token limit the host knows the length itself: no extra forward.
    at_limit = sample(loaded, method, prompt, "deferred")
    assert at_limit.token_ids == free.token_ids
    assert len(at_limit.cache.snapshots) == len(free.cache.snapshots) == GEN["max_new_tokens"]


def test_bad_mode_names_the_choices():
    with pytest.raises(ValueError, match="every_step"), stop_check("late"):
        pass
    assert STOP_CHECKS[0] == "deferred"


def test_the_option_is_checked_before_a_run_and_is_not_part_of_its_identity():
    from mixkvq.config import load_config
    from mixkvq.errors import ConfigError
    from mixkvq.eval.preflight import check_options
    from mixkvq.runs.results import config_hash

    with pytest.raises(ConfigError, match="stop_check.*deferred"):
        check_options(load_config(["stop_check=late"]))
    assert config_hash(load_config(["stop_check=every_step"])) == config_hash(load_config([]))

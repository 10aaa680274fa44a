"""Several problems per generate call (`generation.batch_problems`): left-padded prompts in one cache give each
problem the tokens it gets alone (greedy, fp32), with its own statistics and a share of the call's time."""

from __future__ import annotations

import json

import pytest
import torch

from mixkvq.eval.models import load_model
from mixkvq.eval.protocol import build_prompt, generate_batch, generate_samples
from test_models import qwen7b_dir, tiny_qwen  # noqa: F401  (fixture)
from tiny import build

GEN = {"do_sample": False, "max_new_tokens": 40, "min_new_tokens": 40}


@pytest.fixture(scope="module")
def loaded(qwen7b_dir):  # noqa: F811
    loaded = load_model(tiny_qwen(qwen7b_dir))
    with torch.no_grad():
        loaded.model.lm_head.weight.mul_(8.0)  # peaky logits: greedy is not decided by rounding noise
    return loaded


@pytest.fixture(scope="module")
def prompts(loaded, shared_data):
    lines = (shared_data / "gsm8k" / "test.jsonl").read_text().splitlines()[:3]
    questions = [json.loads(line)["question"] for line in lines]
    texts = [build_prompt(loaded.tokenizer, q, "{question}", think_prefix=True) for q in questions]
    lengths = [len(loaded.tokenizer(t, add_special_tokens=False).input_ids) for t in texts]
    assert len(set(lengths)) == 3  # different lengths: the batch really is left-padded
    return texts


@pytest.mark.parametrize("name", ["bf16", "kivi"])
def test_a_batch_of_problems_gives_each_the_tokens_it_gets_alone(loaded, prompts, name):
    # R=32: the prompts (about 100 tokens) flush blocks at different steps in each row.
    method = build(name, ["method.residual_length=32"] if name == "kivi" else [], model=loaded.model)
    batched = generate_batch(loaded.model, loaded.tokenizer, method, prompts, 1, GEN, 0, "auto")
    assert len(batched) == len(prompts)
    for prompt, out in zip(prompts, batched):
        alone = generate_samples(loaded.model, loaded.tokenizer, method, prompt, 1, GEN, 0, "auto")
        assert out.token_ids == alone.token_ids
        assert out.cache_stats[0]["storage_bits_final"] == pytest.approx(alone.cache_stats[0]["storage_bits_final"])
    assert len({out.seconds for out in batched}) == 1  # each problem carries an equal share of the call


def test_samples_of_each_problem_stay_together(loaded, prompts):
    method = build("kivi", model=loaded.model)
    gen = {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "max_new_tokens": 8}
    outs = generate_batch(loaded.model, loaded.tokenizer, method, prompts[:2], 3, gen, 0, "auto")
    assert [len(o.token_ids) for o in outs] == [3, 3] and all(len(o.cache_stats) == 3 for o in outs)


def test_the_option_keeps_older_runs_identity_and_is_checked():
    from omegaconf import OmegaConf

    from mixkvq.config import load_config
    from mixkvq.errors import ConfigError
    from mixkvq.eval.preflight import generation_kwargs
    from mixkvq.runs.results import config_hash

    cfg = load_config([])
    older = OmegaConf.to_container(cfg, resolve=True)
    del older["generation"]["batch_problems"]  # a run written before the option existed
    assert config_hash(cfg) == config_hash(older)
    assert config_hash(load_config(["generation.batch_problems=4"])) != config_hash(cfg)
    for bad in ("0", "-1", "two"):
        with pytest.raises(ConfigError, match="generation.batch_problems"):
            generation_kwargs(load_config([f"generation.batch_problems={bad}"]))


# ---------------------------------------------------------------- batch_problems=auto (mixkvq/eval/batching.py)


def auto_cfg(*overrides):
    from mixkvq.config import load_config

    return load_config(["generation.batch_problems=auto", "task.n_samples=4", "attention.decode_kernel=auto",
                        *overrides])


def test_a_rows_cache_is_measured_at_its_full_length(loaded):
    from mixkvq.eval.batching import row_bytes_by_device

    model, c = loaded.model, loaded.model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    tokens = 2000  # long against the 128-token window, as a generation is
    dense = 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * tokens * 4  # fp32 keys and values
    (bf16,) = row_bytes_by_device(model, build("bf16", model=model), tokens, "auto").values()
    assert bf16 == pytest.approx(dense, rel=0.02)  # what DynamicCache would hold
    (kivi,) = row_bytes_by_device(model, build("kivi", model=model), tokens, "auto").values()
    assert kivi < bf16 / 3  # 2-bit codes and their scales, the window of 128 to 160 tokens in full precision


def test_auto_takes_as_many_problems_as_fit_and_keeps_its_choice(loaded, tmp_path):
    from mixkvq.eval.batching import RECORD_FILE, problems_per_call, resolve, row_bytes_by_device

    assert problems_per_call(10, 3, 1, 9) == 3 and problems_per_call(1, 3, 1, 9) == 1  # at least one
    assert problems_per_call(10**9, 3, 1, 9) == 9  # at most every problem
    assert problems_per_call(10**9, 3, 16, 99, max_rows=512) == 32  # the CUDA kernels' rows
    model = loaded.model
    method = build("kivi", model=model)
    (row,) = row_bytes_by_device(model, method, 256, "auto").values()
    budget_gib = 2.5 * row * 4 / 2**30  # two and a half problems of 4 samples
    chosen = resolve(auto_cfg(f"generation.cache_memory_gib={budget_gib}"), model, method, 256, 7, tmp_path)
    assert (chosen.batch_problems, chosen.how, chosen.row_bytes, chosen.tokens) == (2, "auto", row, 256)
    assert (tmp_path / RECORD_FILE).exists()
    # A resumed run groups its problems as it did when it started, whatever the budget says now.
    again = resolve(auto_cfg("generation.cache_memory_gib=1000"), model, method, 256, 7, tmp_path)
    assert again == chosen
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    assert resolve(auto_cfg("generation.cache_memory_gib=1000"), model, method, 256, 7, fresh).batch_problems == 7
    set_cfg = auto_cfg("generation.batch_problems=3")
    assert resolve(set_cfg, model, method, 256, 7, fresh).batch_problems == 3


def test_auto_needs_a_budget_where_no_free_memory_is_reported():
    from mixkvq.errors import ConfigError
    from mixkvq.eval.batching import budget_bytes

    with pytest.raises(ConfigError, match="generation.cache_memory_gib"):
        budget_bytes(torch.device("cpu"), None, 0.85)
    assert budget_bytes(torch.device("cpu"), 0.5, 0.85) == 2**29

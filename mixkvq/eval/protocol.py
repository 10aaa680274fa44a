"""The decoding protocol shared by every method: prompt construction and one problem's generate call."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from kernels import kernels_in_use
from mixkvq.eval.dynamic_cache import RecordedDynamicCache
from mixkvq.eval.placement import input_device
from mixkvq.eval.stop_check import stop_check as stop_check_mode
from mixkvq.kv.attention import bind
from mixkvq.kv.cache import QuantizedCache
from mixkvq.kv.graphs import GraphCounts, GraphSettings, graphed
from mixkvq.kv.methods import Method
from mixkvq.kv.ragged import to_device

THINK = "<think>\n"


def build_prompt(tokenizer, question: str, template: str, think_prefix: bool) -> str:
    """The question through the prompt template and the chat template; R1 responses start with <think>."""
    messages = [{"role": "user", "content": template.replace("{question}", question)}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if think_prefix and not text.rstrip().endswith("<think>"):
        text += THINK
    return text


def eos_ids(model, tokenizer) -> set[int]:
    eos = model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) if eos is not None else set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


class CacheStop(StoppingCriteria):
    """Ends the rows the cache has stopped (PM-KVQ's budget overflow at its lowest width)."""

    def __init__(self, cache):
        self.cache = cache

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        return to_device(self.cache.stopped(), input_ids.device)


@dataclass
class Generation:
    token_ids: list[list[int]]  # generated tokens of each sample, up to and including its EOS
    texts: list[str]
    truncated: list[bool]  # hit max_new_tokens without an EOS
    seconds: float
    cache_stats: list[dict]
    kv_peak_allocated_bytes: int | None
    decode_kernels: str  # what `attention.decode_kernel` resolved to over the layers, e.g. "triton"
    cache: QuantizedCache  # the call's cache (rows of every prompt in it), read after generate (MixKVQ's search)
    graph_counts: GraphCounts | None = None  # decode steps replayed from CUDA graphs (None: graphs off or impossible)


def generate_samples(model, tokenizer, method: Method, prompt: str, n: int, gen: dict, seed: int,
                     decode_kernel: str, graphs: GraphSettings = GraphSettings(),
                     stop_check: str = "deferred") -> Generation:
    """n samples of one prompt in one generate call: no padding inside a problem, a fresh cache."""
    return generate_batch(model, tokenizer, method, [prompt], n, gen, seed, decode_kernel, graphs, stop_check)[0]


def generate_batch(model, tokenizer, method: Method, prompts: list[str], n: int, gen: dict, seed: int,
                   decode_kernel: str, graphs: GraphSettings = GraphSettings(),
                   stop_check: str = "deferred", cache_impl: str = "harness") -> list[Generation]:
    """n samples of each prompt in one generate call (prompts left-padded, rows i*n .. i*n+n-1 are prompt i's),
    through a fresh cache allocated once for the longest prompt + max_new_tokens. Each Generation gets an equal
    share of the call's seconds, so per-problem seconds add up to the time spent. `stop_check`: when the host
    reads generate's stop flag (`mixkvq/eval/stop_check.py`). `cache_impl="dynamic"`: transformers' DynamicCache
    and the model's own attention instead of the method's cache (`mixkvq/eval/dynamic_cache.py`)."""
    device = input_device(model)
    stop = eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stop)
    encoded = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    width = max(len(e) for e in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(encoded):
        ids[i, width - len(e):] = torch.tensor(e)
        mask[i, width - len(e):] = 1
    pad = (mask == 0).sum(dim=1).repeat_interleave(n)
    dynamic = cache_impl == "dynamic"
    if dynamic:
        cache = RecordedDynamicCache(model.config, pad)
    else:
        cache = method.new_cache(len(encoded) * n, pad, capacity=width + gen["max_new_tokens"])
    ids, mask = ids.to(device), mask.to(device)
    torch.manual_seed(seed)
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        graph_counts = None
        if not dynamic:  # the method's cache: its attention and decode kernels, its CUDA graphs
            stack.enter_context(bind(model, cache, decode_kernel))
            graph_counts = stack.enter_context(graphed(model, cache, graphs))
        stack.enter_context(stop_check_mode(stop_check))
        stack.enter_context(torch.no_grad())
        kernels = "sdpa" if dynamic else kernels_in_use(cache.layers)
        out = model.generate(ids, attention_mask=mask, past_key_values=cache, num_return_sequences=n,
                             pad_token_id=pad_id, eos_token_id=sorted(stop),
                             stopping_criteria=StoppingCriteriaList([] if dynamic else [CacheStop(cache)]), **gen)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    tokens, truncated, by_budget = [], [], []
    for row, stop_step in zip(out[:, width:].tolist(), cache.stop_step.tolist()):
        end = next((i + 1 for i, t in enumerate(row) if t in stop), None)
        # A cache stop before the row's own end truncates it there (recorded apart from the max-token limit).
        budget = stop_step >= 0 and (end is None or stop_step < end)
        end = stop_step if budget else end
        tokens.append(row[:end] if end is not None else row)
        truncated.append(not budget and end is None and len(row) >= gen["max_new_tokens"])
        by_budget.append(budget)
    texts = tokenizer.batch_decode(tokens, skip_special_tokens=True)
    stats = cache.sequence_stats(torch.tensor([len(t) for t in tokens]))
    for row_stats, budget in zip(stats, by_budget):
        row_stats["truncated_by_budget"] = budget
    peak = cache.peak_allocated_bytes if method.storage == "packed" else None
    share = seconds / len(encoded)
    return [Generation(tokens[i:i + n], texts[i:i + n], truncated[i:i + n], share, stats[i:i + n], peak, kernels,
                       cache, graph_counts) for i in range(0, len(tokens), n)]

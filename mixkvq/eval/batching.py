"""How many problems one generate call takes (`generation.batch_problems`), when a memory budget picks it (`auto`).

A call holds `batch_problems x task.n_samples` rows, each with a cache of the longest prompt + `max_new_tokens`
tokens. `auto` measures what one row's cache takes at that length: a one-row cache of the run's method, bound with
the run's decode kernel (the CUDA kernels lay out their stores when bound) and filled with random tokens through the
method's own write path (mixkvq/kv/synthetic.py), then takes as many problems as fit in the budget on every device
that holds cache layers. The budget is `generation.cache_memory_gib` per device, or by default
`generation.cache_memory_fraction` of what the device has free once the model is loaded: the rest is left to the
step's activations and logits. A call stays within the rows that the CUDA decode kernels take, where the row's
cache was bound to one (more rows would send every layer to the Triton kernel). What `auto` chose is written in the
run folder (`batching.json`) and reused when the run resumes, since the grouping of problems decides their sampled
tokens.
"""

from __future__ import annotations

import gc
import json
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from mixkvq.errors import ConfigError

AUTO = "auto"
RECORD_FILE = "batching.json"


@dataclass(frozen=True)
class Batching:
    batch_problems: int
    how: str  # "set" (the config's number) or "auto"
    row_bytes: int | None = None  # auto: one row's cache at `tokens`, on the device that limits the batch
    budget_bytes: int | None = None  # auto: the cache budget of that device
    tokens: int | None = None  # auto: the cache length the rows were measured at

    def describe(self) -> str:
        if self.how != AUTO:
            return ""
        return (f" (auto: {self.row_bytes / 2**20:.1f} MiB per row at {self.tokens} tokens, "
                f"{self.budget_bytes / 2**30:.1f} GiB for the cache)")


def row_bytes_by_device(model, method, tokens: int, decode_kernel: str) -> dict[torch.device, int]:
    """Bytes one row's cache holds at `tokens` tokens, per device that holds cache layers."""
    return measure_row(model, method, tokens, decode_kernel)[0]


def measure_row(model, method, tokens: int, decode_kernel: str) -> tuple[dict[torch.device, int], int | None]:
    """(bytes one row's cache holds at `tokens` tokens per device that holds cache layers, the most rows the decode
    kernels it was bound to take, or None)."""
    from kernels import LAYOUT_KERNELS, fragment, kernels_in_use
    from mixkvq.kv.attention import bind
    from mixkvq.kv.synthetic import fill_layer

    cache = method.new_cache(1, capacity=tokens)
    q_heads = model.config.num_attention_heads
    with bind(model, cache, decode_kernel), torch.no_grad():
        gen = {}
        for layer in cache.layers:
            device = layer.key_stream.window.data.device
            gen.setdefault(device, torch.Generator(device=device).manual_seed(0))
            fill_layer(layer, tokens, q_heads, gen[device])
    per_device: dict[torch.device, int] = defaultdict(int)
    for layer in cache.layers:
        per_device[layer.key_stream.window.data.device] += layer.allocated_bytes()
    # The CUDA kernels take at most MAX_ROWS rows: more would send every layer to the Triton kernel.
    max_rows = fragment.MAX_ROWS if set(kernels_in_use(cache.layers).split("+")) & set(LAYOUT_KERNELS) else None
    del cache
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return dict(per_device), max_rows


def budget_bytes(device: torch.device, cache_memory_gib: float | None, fraction: float) -> int:
    if cache_memory_gib is not None:
        return int(cache_memory_gib * 2**30)
    if device.type != "cuda":
        raise ConfigError("generation.batch_problems=auto on CPU needs generation.cache_memory_gib (the cache's "
                          "budget); only a CUDA device reports its free memory")
    return int(torch.cuda.mem_get_info(device)[0] * fraction)


def problems_per_call(budget: int, row_bytes: int, n_samples: int, n_problems: int,
                      max_rows: int | None = None) -> int:
    """As many problems as fit (at least one: a run always makes progress), at most all of them, and at most
    `max_rows` rows."""
    fit = budget // max(1, row_bytes * n_samples)
    if max_rows is not None:
        fit = min(fit, max_rows // n_samples)
    return max(1, min(n_problems, fit))


def resolve(cfg, model, method, tokens: int, n_problems: int, run_dir: Path) -> Batching:
    """The run's problems per call: the config's number, what `auto` chose when this run started, or a new choice
    (written to the run folder before the first call)."""
    g = cfg.generation
    setting = g.get("batch_problems", 1)
    if setting != AUTO:
        return Batching(int(setting), "set")
    record = run_dir / RECORD_FILE
    if record.exists():
        return Batching(**json.loads(record.read_text()))
    rows, max_rows = measure_row(model, method, tokens, cfg.attention.decode_kernel)
    budgets = {d: budget_bytes(d, g.cache_memory_gib, g.cache_memory_fraction) for d in rows}
    fits = {d: problems_per_call(budgets[d], b, cfg.task.n_samples, n_problems, max_rows) for d, b in rows.items()}
    device = min(fits, key=fits.get)
    chosen = Batching(fits[device], AUTO, rows[device], budgets[device], tokens)
    tmp = record.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(chosen), indent=1))
    tmp.replace(record)
    return chosen

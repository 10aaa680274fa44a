"""lm-evaluation-harness model `hf-kvq`: lm-eval's HF model with every generate call on a fresh quantized KV cache.

    python -m mixkvq.lmeval.cli run --model hf-kvq --model_args pretrained=<hub id>,kv_method=kivi,k_bits=4 \
        --tasks gsm8k_cot_zeroshot          # lm-eval's own CLI, with this model registered
    python scripts/lm_eval_run.py method=kivi lm_eval.tasks=[gsm8k_cot_zeroshot_local]   # the project's way

`kv_method` names a configs/method/*.yaml; any field of that method's config is an override by its own name
(`k_bits=4`, `residual_length=64`); `kv_storage`, `kv_decode_kernel`, `kv_pack_kernel`, `kv_cuda_graphs` and `kv_model` (the
configs/model entry whose per-model settings a method reads, e.g. MixKVQ's target bits) complete the cache settings. Everything else goes
to lm-eval's HFLM.

Only generation measures KV quantization: a loglikelihood request is one prefill, which attends over exact K/V
here, so this model refuses loglikelihood tasks rather than report them as quantized.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from omegaconf import DictConfig, OmegaConf

from kernels import kernels_in_use
from mixkvq.errors import ConfigError, choice_error
from mixkvq.eval.protocol import eos_ids
from mixkvq.kv.attention import bind
from mixkvq.kv.graphs import GraphSettings, graphed
from mixkvq.kv.methods import METHODS, ModelShape, build_method

MODEL_NAME = "hf-kvq"
# Model arguments that set the cache rather than HFLM; method fields are recognised by name.
CACHE_ARGS = {"kv_storage": "storage", "kv_decode_kernel": "attention.decode_kernel",
              "kv_pack_kernel": "quant.pack_kernel", "kv_cuda_graphs": "attention.cuda_graphs"}
GENERATION_ONLY = (
    f"model {MODEL_NAME!r} runs generation tasks only: a loglikelihood request is one prefill, which attends over "
    "exact K/V here, so KV quantization would not change its score. Run loglikelihood tasks with lm-eval's 'hf' model"
)


def cache_config(kv_method: str, kv_model: str | None = None, **args) -> tuple[DictConfig, dict]:
    """The run config for configs/method/<kv_method>.yaml with the cache arguments among `args` applied, and the
    arguments left for HFLM. Composed from configs/ like a run (the same defaults); bad values raise ConfigError
    here, before a model is loaded."""
    from mixkvq.config import CONFIG_DIR, load_config
    from mixkvq.eval.preflight import check_cache_config

    path = CONFIG_DIR / "method" / f"{kv_method}.yaml"
    if not path.is_file():
        raise choice_error("kv_method", kv_method, [p.stem for p in path.parent.glob("*.yaml")])
    overrides, rest = [f"method={kv_method}"] + ([f"model={kv_model}"] if kv_model else []), {}
    fields = {f.name for f in dataclasses.fields(METHODS.get(load_config(overrides).method.name).config_cls)}
    fields.discard("name")
    for key, value in args.items():
        if key in CACHE_ARGS:
            overrides.append(f"{CACHE_ARGS[key]}={value}")
        elif key in fields:
            overrides.append(f"method.{key}={value}")
        else:
            rest[key] = value
    cfg = load_config(overrides)
    check_cache_config(cfg)
    return cfg, rest


def model_entry(pretrained) -> str | None:
    """The configs/model entry whose hub id is `pretrained`: its per-model method settings apply."""
    from mixkvq.eval.models import model_config, model_names

    if not isinstance(pretrained, str):
        return None
    return next((n for n in model_names() if model_config(n).hub_id == pretrained), None)


@register_model(MODEL_NAME)
class QuantizedKVLM(HFLM):
    """HFLM whose `_model_generate` builds a fresh cache for the (left-padded) batch and binds it to the model.

    `cache_records` gets one dict per generated row: cache statistics (payload and storage bits, bytes), tokens
    and the call's seconds; with `kv_stats_file` they are also appended there as JSON lines (a resumed run
    keeps the rows of its earlier part).
    """

    def __init__(self, pretrained, kv_method: str = "bf16", kv_model: str | None = None,
                 kv_config: DictConfig | None = None, kv_stats_file: str | None = None, **kwargs):
        model_cfg = None if kv_config is None else kv_config.model
        if kv_config is None:  # from lm-eval's --model_args; the project's script passes its run config
            kv_model = kv_model or model_entry(pretrained)
            kv_config, kwargs = cache_config(kv_method, kv_model, **kwargs)
            model_cfg = kv_config.model if kv_model else None  # an unknown model has no per-model settings
        self.kv_config = c = kv_config
        super().__init__(pretrained, **kwargs)
        shape = ModelShape.of(self.model)
        run_cfg = OmegaConf.to_container(c, resolve=True)
        run_cfg["model"] = None if model_cfg is None else run_cfg.get("model")
        self.kv_method = build_method(OmegaConf.create(run_cfg), shape)
        self.kv_method.prepare_model(self.model)
        self.decode_kernel = c.attention.decode_kernel
        self.graphs = GraphSettings.from_config(c.attention)
        self.kv_stats_file = Path(kv_stats_file) if kv_stats_file else None
        self.cache_records: list[dict] = []

    # -- generation: the only path that reads the quantized cache

    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        mask = generation_kwargs.get("attention_mask")
        pad = None if mask is None else (mask == 0).sum(dim=1)  # generate_until pads on the left
        cache = self.kv_method.new_cache(context.shape[0], pad, capacity=max_length)  # prompt + max_gen_toks
        start = time.perf_counter()
        with bind(self.model, cache, self.decode_kernel), graphed(self.model, cache, self.graphs) as counts:
            kernels = kernels_in_use(cache.layers)
            out = super()._model_generate(context, max_length, stop, past_key_values=cache, **generation_kwargs)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._record(cache, out[:, context.shape[1]:], time.perf_counter() - start, kernels, counts)
        return out

    def _record(self, cache, generated: torch.Tensor, seconds: float, kernels: str, counts=None) -> None:
        """Cache statistics of each row at its own end: the first EOS or padding token ends a row."""
        ends = eos_ids(self.model, self.tokenizer) | {self.tokenizer.pad_token_id}
        lengths = [next((i + 1 for i, t in enumerate(row) if t in ends), len(row)) for row in generated.tolist()]
        stats = cache.sequence_stats(torch.tensor(lengths))
        # A KV budget (PM-KVQ) that ends a row cannot stop lm-eval's generate: recorded, not cut.
        rows = [{"n_tokens": n, "gen_seconds": seconds, "batch_rows": len(lengths), "decode_kernels": kernels,
                 "graph_replayed_steps": counts.replayed if counts is not None else None,
                 "truncated_by_budget": bool(step >= 0),
                 "kv_peak_allocated_bytes": cache.peak_allocated_bytes if cache.storage == "packed" else None, **s}
                for n, s, step in zip(lengths, stats, cache.stop_step.tolist())]
        self.cache_records.extend(rows)
        if self.kv_stats_file is not None:
            with self.kv_stats_file.open("a", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)

    # -- scoring requests: prefill only, exact here

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        raise ConfigError(GENERATION_ONLY)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise ConfigError(GENERATION_ONLY)


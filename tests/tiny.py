"""Tiny random-weight models of each supported family, the one method builder of the tests, and helpers to run a
method through generate."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, DynamicCache
from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

from mixkvq.config import load_config
from mixkvq.kv.attention import bind
from mixkvq.kv.methods import Method, ModelShape, build_method

FAMILIES = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config, "mistral": MistralConfig}


def tiny_model(family: str = "llama", dtype=torch.float32, layers: int = 2, q_heads: int = 4, kv_heads: int = 2,
               head_dim: int = 64, vocab: int = 320, seed: int = 0):
    cfg = FAMILIES[family](
        vocab_size=vocab, hidden_size=q_heads * head_dim, intermediate_size=256, num_hidden_layers=layers,
        num_attention_heads=q_heads, num_key_value_heads=kv_heads, head_dim=head_dim, max_position_embeddings=4096,
        pad_token_id=0, eos_token_id=1, bos_token_id=2, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    # Larger random weights give peaky logits, so greedy decoding is not decided by rounding noise.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model


def model_shape(layers: int = 1, kv_heads: int = 2, q_heads: int = 4, head_dim: int = 128, dtype=torch.float32,
                device: str = "cpu") -> ModelShape:
    """A model's shape without a model: what step-by-step and kernel tests build caches for."""
    return ModelShape(layers, kv_heads, q_heads, head_dim, dtype, torch.device(device))


def build(name: str, overrides=(), *, model=None, storage: str = "packed", **shape_fields) -> Method:
    """The method of `configs/method/<name>.yaml` with Hydra `overrides`, for `model` (a model or a ModelShape;
    default `model_shape(**shape_fields)`). The one way tests build methods: the run's own `build_method` on the
    small model's config (for its per-model MixKVQ settings), without a task or logger."""
    cfg = load_config([f"method={name}", f"storage={storage}", "model=smollm2-135m", "~task", "~logger",
                       *overrides])
    return build_method(cfg, model_shape(**shape_fields) if model is None else model)


def generate(model, method, input_ids, attention_mask=None, decode_kernel="auto", layout=None, **gen):
    """Greedy by default; returns (sequences, cache). `layout(layer)` puts each fresh layer in a kernel's storage
    layout first (`to_pages`, `to_tiered_pages`), as binding that kernel would."""
    gen = {"do_sample": False, "max_new_tokens": 40, **gen}
    n = gen.get("num_return_sequences", 1)
    pad = torch.zeros(len(input_ids), dtype=torch.int64)
    if attention_mask is not None:
        pad = (attention_mask == 0).sum(dim=1).cpu()
    cache = method.new_cache(len(input_ids) * n, pad.repeat_interleave(n))
    for layer in cache.layers if layout is not None else ():
        layout(layer)
    with bind(model, cache, decode_kernel), torch.no_grad():
        out = model.generate(input_ids, attention_mask=attention_mask, past_key_values=cache, pad_token_id=0, **gen)
    return out, cache


def generate_dynamic(model, input_ids, attention_mask=None, **gen):
    gen = {"do_sample": False, "max_new_tokens": 40, **gen}
    with torch.no_grad():
        return model.generate(input_ids, attention_mask=attention_mask, past_key_values=DynamicCache(),
                              pad_token_id=0, **gen)


def random_prompts(lengths, vocab: int = 320, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g) for n in lengths]


def left_pad(prompts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.int64, device=prompts[0].device)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    return ids, mask


def load_script(name: str):
    """scripts/<name>.py as a module (scripts are not a package), for tests of their functions."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

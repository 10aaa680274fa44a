"""Tiny random-weight models of each supported family and a helper to run a method through generate."""

from __future__ import annotations

import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, DynamicCache
from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

from mixkvq.attention import bind
from mixkvq.config import load_config
from mixkvq.methods import ModelShape, build_method
from mixkvq.quantizer import QuantSpec

FAMILIES = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config, "mistral": MistralConfig}
PAPER = OmegaConf.create({"mixkvq": {"target_bits": 2.5, "tau_bf16": 1.44, "tau_uint4": 0.79}})


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


def method_for(model, name: str, storage: str = "packed", overrides: list[str] | None = None):
    # Methods need only their own group and the shared quantizer settings, not a model, task or logger.
    cfg = load_config([f"method={name}", f"storage={storage}", "~model", "~task", "~logger", *(overrides or [])])
    shape = ModelShape.of(model)
    quant = QuantSpec.from_config(cfg.quant, shape.dtype)
    return build_method(cfg.method, shape, quant, cfg.storage, PAPER)


def generate(model, method, input_ids, attention_mask=None, decode_kernel="auto", **gen):
    """Greedy by default; returns (sequences, cache)."""
    gen = {"do_sample": False, "max_new_tokens": 40, **gen}
    n = gen.get("num_return_sequences", 1)
    pad = torch.zeros(len(input_ids), dtype=torch.int64)
    if attention_mask is not None:
        pad = (attention_mask == 0).sum(dim=1)
    cache = method.new_cache(len(input_ids) * n, pad.repeat_interleave(n))
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

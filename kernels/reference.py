"""PyTorch reference decode attention: dequantize every stored token of the layer, then SDPA.

It is the ground truth the fused kernels are tested against, and the path used on CPU. It uses the same
SDPA entry point as transformers, so the bf16 method reproduces a plain DynamicCache run token for token.
"""

from __future__ import annotations

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward


def decode_attention(module, query: torch.Tensor, layer, scaling: float) -> torch.Tensor:
    """query [B, Hq, 1, D] -> output [B, 1, Hq, D] over the layer's sink + quantized store + window."""
    keys = layer.key_stream.ragged()
    values = layer.value_stream.ragged()
    lens = keys.lens
    mask = None
    if int(lens.min()) != keys.data.shape[2]:  # rows of different lengths: hide each row's tail
        valid = torch.arange(keys.data.shape[2])[None, :] < lens[:, None]
        mask = valid[:, None, None, :].to(query.device)
    out, _ = sdpa_attention_forward(module, query, keys.data, values.data, mask, dropout=0.0, scaling=scaling)
    return out

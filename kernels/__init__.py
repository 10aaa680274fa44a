"""Decode-attention kernels over a layer's stores, looked up by name (`attention.decode_kernel`).

`torch` is the PyTorch reference: it dequantizes the layer's packed stores and runs SDPA. Fused Triton
kernels register here under their own names; `auto` picks the fastest registered kernel for the device.
"""

from __future__ import annotations

import torch

from kernels.reference import decode_attention as reference_decode_attention
from mixkvq.registry import Registry

DECODE_KERNELS = Registry("attention.decode_kernel")
DECODE_KERNELS.register("torch")(reference_decode_attention)

# Preference order for `auto` per device type; only registered kernels are considered.
AUTO_ORDER = {"cuda": ["triton", "torch"], "cpu": ["torch"]}


def resolve_decode_kernel(name: str, device: torch.device):
    if name == "auto":
        order = AUTO_ORDER.get(device.type, ["torch"])
        name = next(n for n in order if n in DECODE_KERNELS)
    return DECODE_KERNELS.get(name)


def decode_kernel_names() -> list[str]:
    return ["auto", *DECODE_KERNELS.names()]

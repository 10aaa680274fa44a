"""Decode-attention kernels over a layer's stores, looked up by name (`attention.decode_kernel`).

`torch` is the PyTorch reference: it dequantizes the layer's packed stores and runs SDPA. `triton` is the fused
kernel (kernels/decode.py) that reads packed codes directly. `auto` picks, per device, the first registered
kernel in `AUTO_ORDER` that can read the layer's formats.
"""

from __future__ import annotations

import warnings

import torch

from kernels import decode
from kernels.reference import decode_attention as reference_decode_attention
from mixkvq.errors import ConfigError
from mixkvq.registry import Registry

DECODE_KERNELS = Registry("attention.decode_kernel")
DECODE_KERNELS.register("torch")(reference_decode_attention)
DECODE_KERNELS.register("triton")(decode.decode_attention)

# Why a kernel cannot serve a layer (None: it can). Kernels without an entry serve every layer.
KERNEL_SUPPORT = {"triton": decode.supports}

# Preference order for `auto` per device type; only registered kernels are considered.
AUTO_ORDER = {"cuda": ["triton", "torch"], "cpu": ["torch"]}


def _unsupported(name: str, layer) -> str | None:
    check = KERNEL_SUPPORT.get(name)
    return check(layer) if check is not None and layer is not None else None


def resolve_decode_kernel(name: str, device: torch.device, layer=None):
    """The decode function for `layer`: `auto` skips kernels that cannot read it; a named one must."""
    if name != "auto":
        fn = DECODE_KERNELS.get(name)
        why = _unsupported(name, layer)
        if why is not None:
            raise ConfigError(f"attention.decode_kernel={name!r} cannot serve this cache: {why}; use 'torch' or 'auto'")
        return fn
    for candidate in AUTO_ORDER.get(device.type, ["torch"]):
        if candidate in DECODE_KERNELS:
            why = _unsupported(candidate, layer)
            if why is None:
                return DECODE_KERNELS.get(candidate)
            warnings.warn(f"decode kernel {candidate!r} skipped: {why}", stacklevel=2)
    return DECODE_KERNELS.get("torch")


def kernels_in_use(layers) -> str:
    """The registered names of the decode functions bound to these layers, e.g. "triton" or "torch+triton"."""
    names = {name for name in DECODE_KERNELS.names() for layer in layers
             if getattr(layer, "decode_fn", None) is DECODE_KERNELS.get(name)}
    return "+".join(sorted(names)) or "none"


def decode_kernel_names() -> list[str]:
    return ["auto", *DECODE_KERNELS.names()]

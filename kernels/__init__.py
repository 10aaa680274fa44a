"""Decode-attention kernels over a layer's stores, looked up by name (`attention.decode_kernel`).

`torch` is the PyTorch reference: it dequantizes the layer's packed stores and runs SDPA. `cuda` is the CUDA
kernel over fragment pages (kernels/fragment.py: uniform 2/4-bit keys and values, e.g. KIVI); it puts a fresh
layer's stores into its page layout when bound (`KERNEL_PREPARE`). `cuda-tiered` reads MixKVQ's keys in tiered
blocks (kernels/tiered.py). `triton` is the fused kernel
(kernels/decode.py) that reads every other packed format directly. `auto` picks, per device, the first registered
kernel in `AUTO_ORDER` that can read the layer.
"""

from __future__ import annotations

import os
import warnings

import torch

from kernels import decode, fragment, tiered
from kernels.reference import decode_attention as reference_decode_attention
from mixkvq.errors import ConfigError
from mixkvq.registry import Registry

DECODE_KERNELS = Registry("attention.decode_kernel")
DECODE_KERNELS.register("torch")(reference_decode_attention)
DECODE_KERNELS.register("triton")(decode.decode_attention)
DECODE_KERNELS.register("cuda")(fragment.decode_attention)
DECODE_KERNELS.register("cuda-tiered")(tiered.decode_attention)

# Why a kernel cannot serve a layer (None: it can). Kernels without an entry serve every layer.
KERNEL_SUPPORT = {"triton": decode.supports, "cuda": fragment.supports, "cuda-tiered": tiered.supports}
# What a kernel does to a fresh layer before it serves it (its storage layout).
KERNEL_PREPARE = {"cuda": fragment.prepare, "cuda-tiered": tiered.prepare}

# Why a kernel cannot run on a device type at all (None: it can), checked before the model loads. Triton runs on
# a CPU only in its interpreter (TRITON_INTERPRET=1, the tests).
KERNEL_DEVICES = {
    "cuda": lambda device: None if device.type == "cuda" else "it needs a CUDA device",
    "cuda-tiered": lambda device: None if device.type == "cuda" else "it needs a CUDA device",
    "triton": lambda device: None if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    else "it needs a CUDA device (or TRITON_INTERPRET=1)",
}

# Preference order for `auto` per device type; only registered kernels are considered.
# The CUDA kernels first (fragment pages: uniform 2/4-bit, e.g. KIVI; tiered blocks: MixKVQ), then Triton for every
# other packed format (results/bench/decode_step_profile/tiered_kernel.md: MixKVQ's attention 1.64x faster on the
# tiered kernel than on Triton at B=16, 1k).
AUTO_ORDER = {"cuda": ["cuda", "cuda-tiered", "triton", "torch"], "cpu": ["torch"]}
# Kernels built for one layout each: skipping them for other formats is expected, not worth a warning (a cache
# filled before it was bound is: `fragment.FILLED_BEFORE_BIND`).
LAYOUT_KERNELS = ("cuda", "cuda-tiered")


def _unsupported(name: str, layer) -> str | None:
    check = KERNEL_SUPPORT.get(name)
    return check(layer) if check is not None and layer is not None else None


def _bound(name: str, layer):
    prepare = KERNEL_PREPARE.get(name)
    if prepare is not None and layer is not None:
        prepare(layer)
    return DECODE_KERNELS.get(name)


def resolve_decode_kernel(name: str, device: torch.device, layer=None):
    """The decode function for `layer`: `auto` skips kernels that cannot read it; a named one must."""
    if name != "auto":
        DECODE_KERNELS.get(name)  # an unknown name fails here, naming the choices
        why = _unsupported(name, layer)
        if why is not None:
            raise ConfigError(f"attention.decode_kernel={name!r} cannot serve this cache: {why}; use 'torch' or 'auto'")
        return _bound(name, layer)
    for candidate in AUTO_ORDER.get(device.type, ["torch"]):
        if candidate in DECODE_KERNELS:
            why = _unsupported(candidate, layer)
            if why is None:
                return _bound(candidate, layer)
            if candidate not in LAYOUT_KERNELS or why == fragment.FILLED_BEFORE_BIND:
                warnings.warn(f"decode kernel {candidate!r} skipped: {why}", stacklevel=2)
    return DECODE_KERNELS.get("torch")


def kernels_in_use(layers) -> str:
    """The registered names of the decode functions bound to these layers, e.g. "triton" or "torch+triton"."""
    names = {name for name in DECODE_KERNELS.names() for layer in layers
             if getattr(layer, "decode_fn", None) is DECODE_KERNELS.get(name)}
    return "+".join(sorted(names)) or "none"


def kernel_unavailable(name: str, device: torch.device) -> str | None:
    check = KERNEL_DEVICES.get(name)
    return check(device) if check is not None else None


def decode_kernel_names() -> list[str]:
    return ["auto", *DECODE_KERNELS.names()]

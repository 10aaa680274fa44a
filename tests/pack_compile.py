"""Compile the page-write pack kernels for sm_90 without a GPU (run by tests/test_pack_kernels.py in a process
without TRITON_INTERPRET); prints each variant's name once compiled."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import CUDABackend
from triton.compiler import ASTSource
from triton.runtime.jit import create_function_from_signature

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import kernels.pack as pk  # noqa: E402
from mixkvq.kv.quantizer import QuantSpec  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)


def compile_sm90(fn, args, kwargs) -> bytes:
    backend = CUDABackend(TARGET)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=TARGET,
                          options=options.__dict__).asm["cubin"]


def main() -> None:
    d, numerics = 128, pk._numerics(QuantSpec("half_even", "clamp", 1e-6, torch.bfloat16))
    x = torch.zeros(3, 4, 64, d, dtype=torch.bfloat16)
    pages = torch.zeros(3, 4, 8, 800, dtype=torch.int32)
    for name, bits, code_bits, table in (("keys-lockstep", 2, 2, False), ("keys-table-3bit", 4, 3, True)):
        args = (x, *x.stride(), pages, pages.view(torch.int16), pages.stride(0), pages.stride(1), pages.shape[3],
                torch.zeros(5, 3, dtype=torch.int64), 0, 2, *pk.page_key_tables(d, bits, "cpu"), 0, 600, 700)
        assert compile_sm90(pk._page_keys_kernel, args, dict(D=d, BITS=bits, CODE_BITS=code_bits, TABLE=table,
                                                             num_warps=4, **numerics))
        print(name, flush=True)
    flat, count = pages.view(3, 4, -1), torch.zeros(3, dtype=torch.int64)
    for name, lens in (("tokens", False), ("tokens-lens", True)):
        args = (x, *x.stride()[:3], flat, flat.view(torch.int16), flat.stride(0), flat.stride(1), count, count,
                torch.zeros(32, d, dtype=torch.int64), torch.zeros(32, d, dtype=torch.int32),
                torch.zeros(32, 8, dtype=torch.int64), 800)
        assert compile_sm90(pk._page_token_kernel, args, dict(D=d, G=32, BITS=2, LENS=lens, num_warps=2, **numerics))
        print(name, flush=True)


if __name__ == "__main__":
    main()

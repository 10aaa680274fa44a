"""What folding quantization scales into the MMA operands costs in precision (CPU, no GPU): a model of the CUDA
fragment kernel's arithmetic against fp64 attention, beside the operand dtype the kernel could fold into instead.

The fragment kernel (kernels/cuda/fragment_decode.cuh) does not dequantize keys and values element by element: it
computes a key score as sum_c round(q_c * s_c) * code_c + sum_c q_c * z_c, and a value output as
sum_t round(p_t * s_t) * code_t + sum_t p_t * z_t, each `round` to the MMA's 16-bit operand dtype, with fp32
accumulation. This script builds KIVI-2 layers like the GPU tests' (tests/test_fragment_kernel.py: rows of 301, 250
and 77 tokens plus 20 decode steps, keys with per-channel offsets and spreads; the last 128 tokens of a row in full
precision, the rest quantized: keys per channel over 32 tokens, values per token over 32 channels), and reports the
SQNR against fp64 attention over the dequantized tokens of:
- bf16 SDPA over those tokens (what any bf16 kernel pays),
- the fold model with bf16 operands (the kernel as built),
- the fold model with fp16 operands (codes and folded scales in fp16: 3 more mantissa bits).
Set against the kernel's measured SQNR (`results/bench/kernel_sqnr.md`), it says whether the model explains it.

    python scripts/fold_precision.py --out results/bench/fold_precision.md --seeds 30
"""

from __future__ import annotations

import argparse
import datetime
import statistics
from pathlib import Path

import torch

from mixkvq.kv.quantizer import QuantSpec, dequantize, quantize

SPEC = QuantSpec("half_even", "clamp", 1e-6, torch.bfloat16)
WINDOW, GROUP, LENGTHS, STEPS = 128, 32, (301, 250, 77), 20


def rand(gen, *shape) -> torch.Tensor:
    """The GPU tests' tokens: per-channel spreads and offsets (tests/test_fragment_kernel.py `_fill`)."""
    x = torch.randn(*shape, generator=gen) * (1 + 3 * torch.rand(shape[-1], generator=gen))
    return (x + torch.randn(shape[-1], generator=gen)).to(torch.bfloat16)


def row_operands(gen, n: int, heads: int, dim: int):
    """One row's keys and values [heads, n, dim]: the first n - WINDOW (whole groups) quantized, as
    (dequantized bf16 values, codes, scales, zeros) per stream, the window in bf16."""
    k, v = rand(gen, heads, n, dim), rand(gen, heads, n, dim)
    nq = max(0, (n - WINDOW) // GROUP * GROUP)
    kq = k[:, :nq].reshape(heads, nq // GROUP, GROUP, dim).transpose(2, 3)  # groups of 32 tokens per channel
    kc, ks, kz = quantize(kq, 2, SPEC)  # [H, G, D, 32], [H, G, D]
    vq = v[:, :nq].reshape(heads, nq, dim // GROUP, GROUP)  # groups of 32 channels per token
    vc, vs, vz = quantize(vq, 2, SPEC)  # [H, T, D/32, 32], [H, T, D/32]
    k_deq = dequantize(kc, ks, kz, torch.bfloat16).transpose(2, 3).reshape(heads, nq, dim)
    v_deq = dequantize(vc, vs, vz, torch.bfloat16).reshape(heads, nq, dim)
    keys = torch.cat((k_deq, k[:, nq:]), dim=1)
    values = torch.cat((v_deq, v[:, nq:]), dim=1)
    return keys, values, nq, (kc, ks, kz), (vc, vs, vz)


def fold_model(q, keys, values, nq, kq, vq, operand: torch.dtype | None, scaling: float) -> torch.Tensor:
    """Attention for one row, [Hq, D] fp64, with the kernel's folds rounded to `operand` (None: no rounding)."""
    heads, n, dim = keys.shape
    g = q.shape[0] // heads
    r = (lambda x: x) if operand is None else (lambda x: x.to(operand).double())
    kc, ks, kz = (t.double() for t in kq)  # [H, G, D, 32], [H, G, D]
    vc, vs, vz = (t.double() for t in vq)  # [H, T, D/32, 32], [H, T, D/32]
    out = torch.empty(q.shape[0], dim, dtype=torch.float64)
    for hq in range(q.shape[0]):
        h = hq // g
        qh = q[hq].double()  # the model's bf16 query
        # keys: stored tokens through the fold, window tokens as they are
        qs = r(qh[None, :] * ks[h])  # [G, D]: q_c * s_c per group
        stored = (qs[:, :, None] * kc[h]).sum(1) + (qh[None, :] * kz[h]).sum(1)[:, None]  # [G, 32]
        scores = torch.cat((stored.reshape(-1), keys[h, nq:].double() @ qh)) * scaling
        p = torch.softmax(scores, dim=0)
        # values: stored tokens through the fold (p * s per token and channel group), the window's p rounded
        ps = r(p[:nq, None] * vs[h])  # [T, D/32]
        o_stored = ((ps[:, :, None] * vc[h]).sum(0) + (p[:nq, None] * vz[h]).sum(0)[:, None]).reshape(dim)
        o_window = r(p[nq:]) @ values[h, nq:].double()
        out[hq] = o_stored + o_window
    return out


def sqnr(got: torch.Tensor, want: torch.Tensor) -> float:
    return float(10 * torch.log10(want.pow(2).sum() / (got - want).pow(2).sum()))


def scan(gqa: int, head_dim: int, seeds: int) -> dict:
    heads, scaling = 2, head_dim**-0.5
    found = {"sdpa": [], "bf16": [], "fp16": []}
    for seed in range(seeds):
        gen = torch.Generator().manual_seed(seed)
        rows = [row_operands(gen, n + STEPS, heads, head_dim) for n in LENGTHS]
        q = rand(gen, len(LENGTHS), heads * gqa, head_dim)
        want, got = [], {k: [] for k in found}
        for b, (keys, values, nq, kq, vq) in enumerate(rows):
            kr, vr = keys.repeat_interleave(gqa, 0).double(), values.repeat_interleave(gqa, 0).double()
            p = torch.softmax((kr @ q[b].double()[:, :, None])[..., 0] * scaling, dim=-1)
            want.append((p[:, None, :] @ vr)[:, 0])
            sdpa = torch.nn.functional.scaled_dot_product_attention(
                q[b][:, None], keys.repeat_interleave(gqa, 0), values.repeat_interleave(gqa, 0), scale=scaling)
            got["sdpa"].append(sdpa[:, 0].double())
            got["bf16"].append(fold_model(q[b], keys, values, nq, kq, vq, torch.bfloat16, scaling))
            got["fp16"].append(fold_model(q[b], keys, values, nq, kq, vq, torch.float16, scaling))
        w = torch.stack(want)
        for k in found:
            found[k].append(sqnr(torch.stack(got[k]), w))
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="markdown file")
    ap.add_argument("--cases", default="1x64,7x128", help="GQA x head_dim, comma-separated")
    ap.add_argument("--seeds", type=int, default=30)
    args = ap.parse_args()
    lines = [f"# Folded scales against fp64 attention: a model of the fragment kernel's arithmetic (CPU, "
             f"{datetime.date.today().isoformat()})", "",
             f"`python scripts/fold_precision.py --cases {args.cases} --seeds {args.seeds}`: KIVI-2 layers like the "
             "GPU tests', seeds 0 to " f"{args.seeds - 1}. SQNR in dB, median / lowest.", "",
             "| GQA x head_dim | bf16 SDPA | fold, bf16 operands (the kernel) | fold, fp16 operands |",
             "|---|---|---|---|"]
    for case in args.cases.split(","):
        gqa, head_dim = (int(x) for x in case.split("x"))
        found = scan(gqa, head_dim, args.seeds)
        cells = [f"{statistics.median(found[k]):.1f} / {min(found[k]):.1f}" for k in ("sdpa", "bf16", "fp16")]
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

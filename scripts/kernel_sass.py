"""Offline SASS statistics of the fused decode kernel for a Hopper GPU (sm_90), on a machine without one.

Builds one method's layer on the CPU (random tokens through its own flush and pack path, as the GPU benchmark
does), captures the launch `kernels.decode.fused_decode` would make, compiles that exact specialization ahead of
time for sm_90 with Triton, and reads the cubin with the CUDA tools Triton ships (ptxas for registers and spills,
nvdisasm for the instructions). For every loop of the kernel it prints the SASS instructions per iteration (one
iteration is one tile of `TILE_TOKENS` tokens for one warp) by opcode, and for the hot loop, the time a given
(B, L) would take if every scheduler issued one instruction per cycle: an issue-bound floor set by instruction
count alone, to set against the measured time in `results/bench/` (on 2026-12-02 the kernel ran at about a
third of it: instruction count is not what bounds it; see results/bench/sweeps-2026-12-02b).

    python scripts/kernel_sass.py --methods kivi-2,mixkvq-k2.3 --configs default,lean --out <dir>

`--configs` names kernel settings of `scripts/bench_decode_kernel.py` (`TritonTuning` values of kernels/decode.py).
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import subprocess
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import CUDABackend
from triton.compiler import ASTSource
from triton.runtime.jit import create_function_from_signature

from bench_decode_kernel import CONFIGS, tuning_of
from kernels import decode
from mixkvq.config import load_config
from mixkvq.kv.methods import ModelShape, build_method
from mixkvq.kv.synthetic import fill_layer

# The shapes and method formats of the GPU benchmark (scripts/bench_decode_kernel.py).
Q_HEADS, KV_HEADS, HEAD_DIM = 28, 4, 128
METHODS = {
    "kivi-2": ["method=kivi"],
    "kivi-4": ["method=kivi4"],
    "mixkvq-k2.3": ["method=mixkvq", "method.target_bits=2.15"],
    "mixkvq-k2.7": ["method=mixkvq", "method.target_bits=2.35"],
}
TARGET = GPUTarget("cuda", 90, 32)
H200 = dict(sms=132, clock_ghz=1.98, schedulers_per_sm=4)  # the GPU of results/bench (boost clock)
_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def capture_launch(overrides: list[str], tuning: decode.TritonTuning, ctx: int = 1024) -> tuple:
    """(args, kwargs) of the split kernel's first launch for one method's layer filled with `ctx` tokens."""
    cfg = load_config([*overrides, "model=deepseek-r1-distill-7b", "storage=packed", "~task", "~logger"])
    shape = ModelShape(layers=1, kv_heads=KV_HEADS, q_heads=Q_HEADS, head_dim=HEAD_DIM, dtype=torch.bfloat16,
                       device=torch.device("cpu"))
    method = build_method(cfg, shape)
    layer = method.new_cache(1).layers[0]
    gen = torch.Generator().manual_seed(0)
    fill_layer(layer, ctx, Q_HEADS, gen)
    q = torch.randn(1, Q_HEADS, 1, HEAD_DIM, dtype=torch.bfloat16, generator=gen)
    plan = decode.split_plan(q, layer, HEAD_DIM**-0.5, tuning=tuning)
    _, kwargs = plan.launches[0]
    kwargs = {**kwargs, "DOT_DTYPE": triton.language.bfloat16}  # as on CUDA (the interpreter multiplies in fp32)
    return plan.args, kwargs


def compile_sm90(args, kwargs) -> dict:
    """Compile the split kernel's specialization for sm_90: the cubin and ptxas's resource line."""
    fn = decode._decode_split_kernel
    backend = CUDABackend(TARGET)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, options)
    kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=TARGET, options=options.__dict__)
    return kernel.asm


def resources(ptx: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        cmd = [str(_BIN / "ptxas"), "-v", "--gpu-name=sm_90a", str(src), "-o", str(Path(tmp) / "k.o")]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    lines = [line.split("info    : ")[-1] for line in res.stderr.splitlines()]
    return " ".join(line for line in lines if "Used" in line or "spill" in line)


_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_LABEL = re.compile(r"^(\.L_x_\d+):", re.M)


def sass_loops(cubin: bytes) -> list[dict]:
    """Every loop (a backward branch and its target label) with its instruction count and opcode histogram."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(_BIN / "nvdisasm"), f.name], capture_output=True, text=True, check=True).stdout
    labels = {m.group(1): m.end() for m in _LABEL.finditer(text)}
    instrs = [(m.start(), int(m.group(1), 16), m.group(3), m.group(4)) for m in _INSTR.finditer(text)]
    label_addr = {name: next((a for pos, a, _, _ in instrs if pos > at), None) for name, at in labels.items()}
    loops = []
    for _, addr, op, rest in instrs:
        target = re.search(r"\(?(\.L_x_\d+)\)?", rest)
        if op == "BRA" and target and (label_addr.get(target.group(1)) or addr + 1) <= addr:
            lo = label_addr[target.group(1)]
            body = [o for _, a, o, _ in instrs if lo <= a <= addr]
            loops.append(dict(start=lo, end=addr, instructions=len(body), ops=collections.Counter(
                o.split(".")[0] for o in body).most_common()))
    return loops


def issue_floor_us(instr_per_warp_tile: int, bsz: int, ctx: int, num_warps: int, gpu=H200) -> float:
    """Time for (B, L) if every scheduler issued one instruction of the hot loop per cycle, nothing else."""
    tiles = bsz * KV_HEADS * ctx // decode.TILE_TOKENS
    warp_instr = tiles * num_warps * instr_per_warp_tile
    return warp_instr / (gpu["sms"] * gpu["schedulers_per_sm"] * gpu["clock_ghz"] * 1e3)


def report(name: str, config: str, bsz: int, ctx: int) -> dict:
    tuning = tuning_of(config)
    args, kwargs = capture_launch(METHODS[name], tuning)
    asm = compile_sm90(args, kwargs)
    loops = sass_loops(asm["cubin"])
    # The loops with tensor-core instructions, in program order: the sink's (when there is one), the whole tiles'
    # (the hot loop), the rest's.
    mma = [lp for lp in loops if any(op.startswith("HMMA") for op, _ in lp["ops"])]
    hot = mma[1 if kwargs["HAS_SINK"] else 0]
    floor = issue_floor_us(hot["instructions"], bsz, ctx, tuning.num_warps)
    row = dict(method=name, config=config, resources=resources(asm["ptx"]), loops=loops, hot_loop=hot["start"],
               hot_instructions=hot["instructions"], issue_floor_us=floor, shape=f"{bsz}x{ctx}")
    print(f"{name} [{config}]: {row['resources']}")
    for lp in loops:
        mark = "  <- hot" if lp is hot else ""
        top = ", ".join(f"{o} {n}" for o, n in lp["ops"][:10])
        print(f"  loop @{lp['start']:#x}: {lp['instructions']} instructions per warp per tile{mark}: {top}")
    print(f"  issue-bound floor at B={bsz}, L={ctx}: {floor:.0f} us ({H200['sms']} SMs x "
          f"{H200['schedulers_per_sm']} schedulers at {H200['clock_ghz']} GHz, one instruction per cycle)")
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="kivi-2,mixkvq-k2.3", help=f"subset of {list(METHODS)}")
    ap.add_argument("--shape", default="64x32768", help="BxL for the issue-bound floor")
    ap.add_argument("--configs", default="default", help=f"subset of {list(CONFIGS)}")
    ap.add_argument("--out", type=Path, help="folder for kernel_sass.json")
    a = ap.parse_args()
    bsz, ctx = (int(x) for x in a.shape.split("x"))
    rows = []
    for name in a.methods.split(","):
        for config in a.configs.split(","):
            rows.append(report(name, config, bsz, ctx))
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "kernel_sass.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

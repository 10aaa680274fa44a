"""Where the decode kernel's time goes: the whole-tile loop in full, with loads and dequantization only, and with
loads only, side by side in one process (GPU). Needs `results/bench/sweeps-2026-12-02b/probe_experiment.patch`
applied (it adds the `probe` setting to kernels/decode.py's TritonTuning); the patch is not part of the kernel.

    git apply results/bench/sweeps-2026-12-02b/probe_experiment.patch
    python scripts/bench_decode_probe.py --out <dir>
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

import bench_decode_kernel as bench
from kernels import decode

PROBES = {"full": 0, "dequant only": 1, "loads only": 2}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--shapes", default="8x32768,64x32768")
    ap.add_argument("--methods", default="kivi-2,kivi-4,mixkvq-k2.3")
    args = ap.parse_args()
    if "probe" not in {f.name for f in dataclasses.fields(decode.TritonTuning)}:
        raise SystemExit("apply results/bench/sweeps-2026-12-02b/probe_experiment.patch first")
    gen = torch.Generator("cuda").manual_seed(0)
    rows = []
    for shape in args.shapes.split(","):
        bsz, ctx = (int(x) for x in shape.split("x"))
        sdpa_ms, _ = bench.bench_sdpa(bsz, ctx, gen)
        rows.append(dict(B=bsz, L=ctx, method="bf16-sdpa", kernel="-", probe="-", us=sdpa_ms * 1e3))
        for name in args.methods.split(","):
            for kernel, lean in (("one kernel", None), ("lean", 0)):
                for probe, value in PROBES.items():
                    tuning = dataclasses.replace(decode.DEFAULT_TUNING, probe=value, lean_min_tiles=lean)
                    r = bench.bench_method(bench.METHODS[name], bsz, ctx, gen, tuning)
                    rows.append(dict(B=bsz, L=ctx, method=name, kernel=kernel, probe=probe, us=r["ms"] * 1e3,
                                     bytes=r["bytes"]))
                    print(f"B={bsz:3d} L={ctx} {name:12s} {kernel:10s} {probe:13s} {r['ms'] * 1e3:8.1f} us", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__)
    (args.out / "decode_probe.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))


if __name__ == "__main__":
    main()

#!/usr/bin/env bash
# `python run.py method=kivi` on a GPU, greedy, through the CUDA kernel (auto) and through the PyTorch reference:
# which kernels the run used and how many generated tokens agree. Random-weight DeepSeek-R1-Distill-Qwen-7B cut to
# a few layers (shapes and speed only). Usage: scripts/gpu_run_check.sh <model folder> <gsm8k jsonl> <results dir>
set -euo pipefail
model=$1 data=$2 out=$3
common=(method=kivi model=deepseek-r1-distill-7b model.random_init=true "model.path=$model"
        "+model.config_overrides.num_hidden_layers=4" task=gsm8k "task.data_files=$data" task.limit=2 task.n_samples=1
        generation.do_sample=false generation.max_new_tokens=512 logger.mode=disabled grading_workers=0 progress=false)
for kernel in auto torch; do
    python3 run.py "${common[@]}" attention.decode_kernel=$kernel "results_dir=$out/$kernel"
done
python3 - "$out" <<'PY'
import sys, glob
import pandas as pd
out = sys.argv[1]
runs = {k: pd.read_parquet(glob.glob(f"{out}/{k}/*/run.parquet")[0]).iloc[0] for k in ("auto", "torch")}
samples = {k: pd.read_parquet(glob.glob(f"{out}/{k}/*/samples.parquet")[0]) for k in ("auto", "torch")}
for k, r in runs.items():
    print(f"{k}: decode_kernels_used={r['decode_kernels_used']} tokens/s={r['tokens_per_s']:.1f}")
a, b = samples["auto"].sort_values(["problem_id", "sample_index"]), samples["torch"].sort_values(["problem_id", "sample_index"])
same = total = 0
first = []
for x, y in zip(a["token_ids"], b["token_ids"]):
    n = min(len(x), len(y))
    eq = [int(p == q) for p, q in zip(x[:n], y[:n])]
    same += sum(eq); total += n
    first.append(eq.index(0) if 0 in eq else n)
print(f"greedy tokens equal at {same}/{total} positions; first difference per sample: {first}")
PY

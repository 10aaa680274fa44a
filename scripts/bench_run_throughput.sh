#!/usr/bin/env bash
# What a researcher gets from `python run.py` on a GPU: generated tokens per second of whole runs (prefill, decode,
# grading and writing included) for each method, one problem per generate call and `batch_problems` per call.
# Random-weight DeepSeek-R1-Distill-Qwen-7B (shapes and speed only), GSM8K prompts, sampled (random weights
# rarely sample an end of sequence, so nearly every sample runs to max_new_tokens).
#
#   scripts/bench_run_throughput.sh <model folder> <gsm8k jsonl> <out dir> [new tokens] [samples] [batch_problems] \
#       [more run.py overrides...]
#
# METHODS (default "bf16-dynamic bf16 kivi mixkvq"; bf16-dynamic is transformers' DynamicCache) and PER_CALL
# (problems per generate call, default "1 <batch_problems>") in the environment choose the runs, e.g. METHODS=kivi
# PER_CALL=12 for one method at 12 problems per call, or PER_CALL=auto
# for as many of the <batch_problems> problems as fit in the GPU's memory (generation.batch_problems=auto).
#
# Writes <out dir>/run_throughput.md (one line per run, from each run's run.parquet) and keeps the run folders.
set -euo pipefail
model=$1 data=$2 out=$3 new=${4:-512} samples=${5:-16} batch=${6:-4}
shift $(( $# < 6 ? $# : 6 ))
common=(model=deepseek-r1-distill-7b model.random_init=true "model.path=$model" task=gsm8k "task.data_files=$data"
        "task.n_samples=$samples" "generation.max_new_tokens=$new"
        logger.mode=disabled grading_workers=0 progress=false "$@")
for method in ${METHODS:-bf16-dynamic bf16 kivi mixkvq}; do
    # bf16-dynamic: transformers' DynamicCache and attention (method=bf16 attention.cache=dynamic)
    run=(method=${method%-dynamic})
    [[ $method == *-dynamic ]] && run+=(attention.cache=dynamic)
    for per_call in ${PER_CALL:-1 $batch}; do
        # as many problems as one call of the larger batch holds, so both settings generate the same tokens
        python3 run.py "${common[@]}" "${run[@]}" "task.limit=$batch" "generation.batch_problems=$per_call" \
            "results_dir=$out/$method-b$per_call"
    done
done
python3 - "$out" "$new" "$samples" <<'PY'
import glob, sys
import pandas as pd
out, new, samples = sys.argv[1:]
lines = [f"# run.py throughput ({new} new tokens x {samples} samples per problem)", "",
         "| run | method | problems per call | rows per call | tokens/s | peak GiB | decode kernels "
         "| decode steps from CUDA graphs | device |",
         "|---|---|---|---|---|---|---|---|---|"]
for path in sorted(glob.glob(f"{out}/*/*/run.parquet")):
    r = pd.read_parquet(path).iloc[0]
    s = pd.read_parquet(path.replace("run.parquet", "samples.parquet"))
    per_call = int(s["problems_in_call"].max())
    replayed = s["graph_replayed_steps"].dropna() if "graph_replayed_steps" in s else []
    graphs = f"{int(replayed.iloc[0])} per call" if len(replayed) else "none"
    lines.append(f"| {path.split('/')[-3]} | {r['label']} | {per_call} | {per_call * int(samples)} | "
                 f"{r['tokens_per_s']:.0f} | {r['peak_mem_bytes'] / 2**30:.1f} | {r['decode_kernels_used']} | "
                 f"{graphs} | {r['device']} |")
text = "\n".join(lines) + "\n"
print(text)
open(f"{out}/run_throughput.md", "w").write(text)
PY

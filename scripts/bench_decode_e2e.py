"""End-to-end decode throughput and peak memory on a random-weight DeepSeek-R1-Distill-Qwen-7B, one GPU.

For each method and context length the cache of every layer is filled with random keys and values through the
method's own flush and pack path (mixkvq/kv/synthetic.py: same stored state, hence same decode cost, as a real
prefill), then `--steps` decode steps of the whole model are timed (after warm-up), the harness caches' steps
replayed from CUDA graphs as `run.py` replays them (`--graphs never`: eager). `bf16-dynamic` is transformers'
DynamicCache with SDPA, the baseline; `bf16` is the unquantized reference through this harness's cache.

Batch sizes: 1, and the largest batch that fits, found by the script: a batch-1 fill gives the cache bytes per
sequence, the free memory after the weights gives a first guess, each out-of-memory attempt retries at 85%, and
from the first batch that fits the search goes up by 8% while one does. The fill writes `FILL_ROW_TOKENS` tokens
over all rows at a time, so its transient memory does not set the largest batch.

    python scripts/bench_decode_e2e.py --config-dir DIR --out results/bench     # GPU: decode_e2e.{json,md}
    python scripts/bench_decode_e2e.py --plot results/bench/decode_e2e.json    # PNG of tokens/s vs context
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import time
from pathlib import Path

import torch

FILL_ROW_TOKENS = 65536  # tokens x rows per fill chunk (chunks of 128 to 2048 tokens)
GROW_TRIES = 4  # batches tried above the first that fits
WARMUP = 3  # decode steps before the timed ones (with graphs: an eager step, a recording, a replay)
METHODS = {
    "bf16-dynamic": None,
    "bf16": ["method=bf16"],
    "kivi-2": ["method=kivi"],
    "mixkvq-k2.3": ["method=mixkvq", "method.target_bits=2.15"],
    "mixkvq-C3.4": ["method=mixkvq"],  # the paper's 7B setting (model config)
    # KVmix's default allocation on R1-7B's 28 layers: 2 x floor(0.1 x 28) = 4 layers at 3/4 bits. Which layers is
    # calibration's choice and does not change the cost: the first four here (no artifact needed).
    "kvmix": ["method=kvmix", "method.layer_bits={key:[%s],value:[%s]}" % (",".join(["3"] * 4 + ["2"] * 24),
                                                                          ",".join(["4"] * 4 + ["2"] * 24))],
    # PM-KVQ at 2 bits, key reparameterization off (no calibration artifact; it changes values, not cost)
    "pmkvq-2": ["method=pmkvq_fbit2", "method.reparameterize=false"],
}


def build_model(config_dir: Path):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(config_dir)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    return model


def new_cache(model, overrides, batch: int, context: int, room: int):
    from mixkvq.config import load_config
    from mixkvq.kv.attention import bind
    from mixkvq.kv.methods import build_method
    from mixkvq.kv.synthetic import fill_cache

    if overrides is None:
        return dynamic_cache(model, batch, context)
    cfg = load_config([*overrides, "model=deepseek-r1-distill-7b", "storage=packed", "~task", "~logger"])
    method = build_method(cfg, model)
    cache = method.new_cache(batch, capacity=context + room)  # allocated once, as run.py allocates it
    # Bound while fresh, as run.py binds before prefill: the CUDA kernels put the stores in their page layouts then,
    # and a cache filled first could only be read by the Triton kernel.
    with bind(model, cache):
        chunk = max(128, min(2048, FILL_ROW_TOKENS // batch // 128 * 128))
        fill_cache(cache, context, model.config.num_attention_heads, chunk=chunk)
    return cache


def dynamic_cache(model, batch: int, context: int):
    from transformers import DynamicCache

    c = model.config
    cache = DynamicCache(config=c)
    shape = (batch, c.num_key_value_heads, context, c.hidden_size // c.num_attention_heads)
    for i in range(c.num_hidden_layers):
        cache.update(torch.randn(shape, device="cuda", dtype=torch.bfloat16),
                     torch.randn(shape, device="cuda", dtype=torch.bfloat16), i)
    return cache


def decode_steps(model, cache, batch: int, steps: int, warmup: int = WARMUP, graphs: bool = True):
    """(seconds per decode step of the whole model, the graph counts of warm-up and timed steps or None). With
    `graphs` a harness cache's steps replay from CUDA graphs as in `run.py` (`mixkvq.kv.graphs`): the first steps
    of the warm-up run eagerly and record; DynamicCache's steps stay eager (transformers' own path)."""
    from mixkvq.kv.attention import bind
    from mixkvq.kv.cache import QuantizedCache
    from mixkvq.kv.graphs import GraphSettings, graphed

    device = next(model.parameters()).device  # CUDA here; the CPU runs it in the tests, eagerly
    ids = torch.randint(0, model.config.vocab_size, (batch, 1), device=device)
    pos = torch.full((batch, 1), cache.get_seq_length(), device=device)  # a graph takes its positions as input

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def run(n):
        for _ in range(n):
            model(input_ids=ids, position_ids=pos, past_key_values=cache, use_cache=True, logits_to_keep=1)
            pos.add_(1)

    def timed():
        run(warmup)
        sync()
        t0 = time.perf_counter()
        run(steps)
        sync()
        return (time.perf_counter() - t0) / steps

    with torch.no_grad():
        if not isinstance(cache, QuantizedCache):
            return timed(), None
        with bind(model, cache), graphed(model, cache, GraphSettings(enabled=graphs)) as counts:
            return timed(), counts


def measure(model, overrides, batch: int, context: int, steps: int, graphs: bool) -> dict:
    from kernels import kernels_in_use

    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    cache = new_cache(model, overrides, batch, context, room=steps + WARMUP)
    fill_peak = torch.cuda.max_memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step, counts = decode_steps(model, cache, batch, steps, graphs=graphs)
    kv_bytes = cache.allocated_bytes() if hasattr(cache, "allocated_bytes") else sum(
        layer.keys.numel() * 2 + layer.values.numel() * 2 for layer in cache.layers)
    row = dict(batch=batch, context=context, ms_per_step=step * 1e3, tok_s=batch / step,
               peak_gib=torch.cuda.max_memory_allocated() / 2**30, fill_peak_gib=fill_peak / 2**30,
               kv_gib=kv_bytes / 2**30,
               graph_replayed=None if counts is None else counts.replayed,  # of warm-up and timed steps
               graph_eager=None if counts is None else counts.eager,
               decode_kernels=kernels_in_use(cache.layers) if counts is not None else "sdpa (DynamicCache)")
    del cache
    return row


def largest_batch(model, overrides, context: int, steps: int, per_seq: float, cap: int,
                  graphs: bool) -> dict | None:
    """Down by 15% from a first guess until a batch fits, then up by 8% (at most GROW_TRIES times) while one does."""
    gc.collect()
    torch.cuda.empty_cache()
    free = torch.cuda.mem_get_info()[0]
    guess, best = max(1, min(cap, int(0.8 * free / per_seq))), None
    for _ in range(8):
        try:
            best = measure(model, overrides, guess, context, steps, graphs)
            break
        except torch.OutOfMemoryError:
            guess = int(guess * 0.85)
            if guess < 1:
                return None
    for _ in range(GROW_TRIES if best is not None else 0):
        guess = min(cap, int(guess * 1.08) + 1)
        if guess == best["batch"]:
            break
        try:
            best = measure(model, overrides, guess, context, steps, graphs)
        except torch.OutOfMemoryError:
            break
    if best is not None:
        best["search"] = "fits"
    return best


def run(args) -> None:
    model = build_model(args.config_dir)
    names = args.methods.split(",")
    meta = dict(device=torch.cuda.get_device_name(), date=datetime.date.today().isoformat(),
                torch=torch.__version__, model="DeepSeek-R1-Distill-Qwen-7B config, random bf16 weights",
                steps=args.steps, pack_kernel=args.pack_kernel, cuda_graphs=args.graphs)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []

    def add(row):  # written after every row: a run cut short keeps what it measured
        rows.append(row)
        print(row, flush=True)
        (args.out / "decode_e2e.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))

    def overrides(name):  # the method's, packing as asked
        return None if METHODS[name] is None else [*METHODS[name], f"quant.pack_kernel={args.pack_kernel}"]

    for context in [int(c) for c in args.contexts.split(",")]:
        for name in names:
            one = measure(model, overrides(name), 1, context, args.steps, args.graphs == "auto")
            add(dict(method=name, **one))
            if context in [int(c) for c in args.max_batch_contexts.split(",")]:
                per_seq = one["kv_gib"] * 2**30 * 1.15  # windows and metadata grow by doubling: some slack
                best = largest_batch(model, overrides(name), context, args.steps, per_seq, args.cap,
                                     args.graphs == "auto")
                if best is not None:
                    add(dict(method=name, **best))
    write_markdown(meta, rows, args.out / "decode_e2e.md")


def write_markdown(meta, rows, path: Path) -> None:
    base = {(r["context"], r["batch"]): r for r in rows if r["method"] == "bf16-dynamic"}
    best_base = {}
    for r in rows:
        if r["method"] == "bf16-dynamic":
            best_base[r["context"]] = max(best_base.get(r["context"], 0), r["tok_s"])
    lines = [f"# End-to-end decode, {meta['model']}, {meta['device']}, {meta['date']}", "",
             "Per context: batch 1, then the largest batch that fits (found by the script). `vs bf16 step`: this "
             "step time over bf16-dynamic's at the same batch; `vs best bf16 tok/s`: throughput over bf16-dynamic's "
             "best at that context. `replayed`: of the warm-up and timed steps, those replayed from CUDA graphs "
             f"(harness caches; graphs {meta.get('cuda_graphs', 'never')}). `kernels`: the decode kernels the "
             "layers ran.", "",
             "| method | context | batch | ms/step | tok/s | vs bf16 step | vs best bf16 tok/s | KV GiB | peak GiB "
             "| replayed | kernels |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b = base.get((r["context"], r["batch"]))
        rel = f"{r['ms_per_step'] / b['ms_per_step']:.2f}x" if b else "-"
        thr = f"{r['tok_s'] / best_base[r['context']]:.2f}x" if r["context"] in best_base else "-"
        replayed = "-" if r.get("graph_replayed") is None else f"{r['graph_replayed']}/{WARMUP + meta['steps']}"
        lines.append(f"| {r['method']} | {r['context']} | {r['batch']} | {r['ms_per_step']:.1f} | {r['tok_s']:.0f} | "
                     f"{rel} | {thr} | {r['kv_gib']:.2f} | {r['peak_gib']:.1f} | {replayed} | "
                     f"{r.get('decode_kernels', 'not recorded')} |")
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def plot(json_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(json_path.read_text())
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, largest in zip(axes, (False, True)):
        for name in dict.fromkeys(r["method"] for r in data["rows"]):
            pts = {}
            for r in data["rows"]:
                if r["method"] == name and ((r["batch"] == 1) != largest):
                    pts[r["context"]] = max(pts.get(r["context"], 0), r["tok_s"])
            if pts:
                xs = sorted(pts)
                ax.plot(xs, [pts[x] for x in xs], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("decode tokens/s")
        ax.set_title("largest batch that fits" if largest else "batch 1")
        ax.legend(fontsize=8)
    fig.suptitle(f"{data['meta']['model']}, {data['meta']['device']}, {data['meta']['date']}", fontsize=9)
    fig.tight_layout()
    out = json_path.with_suffix(".png")
    fig.savefig(out, dpi=120)
    print(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config-dir", type=Path, help="folder with the model's config.json")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--methods", default=",".join(METHODS), help=f"subset of {list(METHODS)}")
    ap.add_argument("--contexts", default="4096,8192,32768")
    ap.add_argument("--max-batch-contexts", default="8192,32768", help="contexts at which the largest batch is run")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--cap", type=int, default=256, help="largest batch tried (the CUDA kernels take 512 rows)")
    ap.add_argument("--graphs", default="auto", choices=["auto", "never"],
                    help="the harness caches' decode steps replayed from CUDA graphs, as run.py does "
                         "(attention.cuda_graphs); DynamicCache's run eagerly either way")
    ap.add_argument("--pack-kernel", default="auto", choices=["auto", "triton", "torch"],
                    help="who quantizes and packs the stores' writes (quant.pack_kernel)")
    ap.add_argument("--plot", type=Path, help="only draw the PNG from a decode_e2e.json")
    args = ap.parse_args()
    if args.plot:
        data = json.loads(args.plot.read_text())
        write_markdown(data["meta"], data["rows"], args.plot.with_suffix(".md"))
        return plot(args.plot)
    unknown = sorted(set(args.methods.split(",")) - set(METHODS))
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    if not (args.config_dir and args.out):
        raise SystemExit("--config-dir and --out are required (or --plot)")
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA device")
    run(args)


if __name__ == "__main__":
    main()

"""Aggregation of result folders into tables and plots, shared by scripts/make_tables.py and notebooks/.

Reads every run under a folder (any depth), reports damaged or unfinished runs by name and goes on with the
rest, and builds: the method x task table (pass@1 +- s.e., bits, memory, and the teacher-forced fidelity of the
same method setting), our numbers beside the papers' published ones (results/papers/*.csv), the fidelity table
(KL, top-1, ΔNLL beside bits; scripts/fidelity.py runs) and the plots (accuracy and fidelity vs storage bits,
memory and throughput vs context, per-layer error, KL by position). Pure functions of DataFrames; only the
`plot_*` functions import matplotlib.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from omegaconf import OmegaConf
from tabulate import tabulate

from mixkvq.eval.fidelity_metrics import TOKEN_COLUMNS
from mixkvq.eval.fidelity_metrics import summarize as summarize_fidelity
from mixkvq.runs.results import CONFIG_FILE, METHOD_KEYS, RUN_FILE, SAMPLES_FILE, VOLATILE_KEYS, restore_moved_keys

# Fidelity runs (scripts/fidelity.py) as mixkvq/eval/fidelity.py writes them; not imported from there (torch).
FIDELITY_KIND = "fidelity"
LAYERS_FILE = "layers.parquet"

MIB = 2**20
REPO = Path(__file__).resolve().parents[2]


def repo_path(path: str | Path) -> Path:
    """A results folder as the README writes it: relative to the repository root, wherever the caller runs
    (a notebook kernel runs in notebooks/)."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else REPO / path

# Paper names of our models, tasks and methods (results/papers/README.md, "Model names").
PAPER_MODELS = {
    "deepseek-r1-distill-7b": ["R1-Qwen-7B"],
    "deepseek-r1-distill-14b": ["R1-Qwen-14B"],
    "deepseek-r1-distill-32b": ["R1-Qwen-32B"],
    "deepseek-r1-distill-llama-8b": ["R1-Llama-8B", "R1-LLaMA-8B"],
    "qwq-32b": ["QwQ-32B"],
}
PAPER_TASKS = {"aime24": ["AIME-24"], "aime25": ["AIME-25"], "math500": ["MATH500"], "gsm8k": ["GSM8K"],
               ("aime24", "aime25"): ["AIME24-25"]}  # MixKVQ pools AIME 2024 and 2025 (60 problems)
PAPER_METHODS = {"bf16": ["BF16", "original", "fp16", "16bit", "16-bit"], "kivi": ["KIVI"], "mixkvq": ["MixKVQ"],
                 "pmkvq": ["PM-KVQ"], "kvmix": ["KVmix"]}
# The paper tables the experiments reproduce (configs/experiment/), by file stem; accuracy metrics only.
PAPER_TABLES = {
    "mixkvq_table3": ("MixKVQ Table 3", "accuracy"),
    "pmkvq_table2": ("PM-KVQ Table 2", "pass@1"),
    "kivi_table3": ("KIVI Table 3 (GSM8K)", "exact_match"),
    "kvmix_table3": ("KVmix Table 3 (GSM8K)", "accuracy"),
}


# ---------------------------------------------------------------- reading


@dataclass
class Collected:
    runs: pd.DataFrame                       # one row per finished evaluation run (run.parquet + label columns)
    samples: pd.DataFrame                    # every sample row of those runs, with run_name
    problems: list[tuple[str, str]] = field(default_factory=list)  # (path, what is wrong), reported, skipped
    fidelity: pd.DataFrame = field(default_factory=pd.DataFrame)  # one row per finished fidelity run
    layers: pd.DataFrame = field(default_factory=pd.DataFrame)    # their per-layer rows (layers.parquet), run_name

    def report(self) -> str:
        return "\n".join(f"skipped {path}: {why}" for path, why in self.problems)


def _read(path: Path, problems: list, wanted: list[str] | None = None) -> pd.DataFrame | None:
    """A parquet file (only the `wanted` columns it has), or None with the problem recorded."""
    try:
        columns = None if wanted is None else [c for c in wanted if c in pq.read_schema(path).names]
        return pq.read_table(path, columns=columns).to_pandas()
    except (pa.ArrowException, OSError) as e:
        problems.append((str(path), f"unreadable parquet ({type(e).__name__}: {e})"))
        return None


def _method_key(run_dir: Path) -> str:
    """Short hash of the method settings: tells two configs of one method apart (e.g. KIVI variants)."""
    cfg = run_dir / CONFIG_FILE
    if not cfg.exists():
        return ""
    node = restore_moved_keys(OmegaConf.to_container(OmegaConf.load(cfg), resolve=False)).get("method", {})
    return hashlib.sha256(json.dumps(node, sort_keys=True, default=str).encode()).hexdigest()[:4]


def _result_config(run_dir: Path) -> str:
    """The run's settings that change results, beyond its method, flattened to `key: value` (JSON)."""
    cfg = run_dir / CONFIG_FILE
    if not cfg.exists():
        return "{}"
    node = restore_moved_keys(OmegaConf.to_container(OmegaConf.load(cfg), resolve=False))
    kept = {k: v for k, v in node.items() if k not in VOLATILE_KEYS + METHOD_KEYS}
    flat = pd.json_normalize(kept, sep=".").iloc[0].to_dict() if kept else {}
    return json.dumps(flat, sort_keys=True, default=str)


# Sample columns the tables and plots use (responses and token ids stay on disk).
SAMPLE_COLUMNS = ["problem_id", "sample_index", "correct", "n_tokens", "prompt_tokens", "gen_seconds",
                  "kv_bytes_final", "kv_bytes_bf16_final", "storage_bits_final", "payload_bits_final"]


def collect(root: str | Path) -> Collected:
    """Every run under `root` (any depth). Damaged files and unfinished runs are reported and skipped."""
    root = Path(root)
    problems: list[tuple[str, str]] = []
    runs, samples, fidelity, layers = [], [], [], []
    dirs = sorted({p.parent for name in (RUN_FILE, SAMPLES_FILE) for p in root.rglob(name)
                   if "wandb" not in p.relative_to(root).parts})
    for d in dirs:
        if not (d / RUN_FILE).exists():
            problems.append((str(d), "unfinished run (no run.parquet); rerun its config to complete it"))
            continue
        row = _read(d / RUN_FILE, problems)
        if row is not None and row.get("kind", pd.Series([None])).iloc[0] == FIDELITY_KIND:
            lay = _read(d / LAYERS_FILE, problems) if (d / LAYERS_FILE).exists() else pd.DataFrame()
            tok = _read(d / SAMPLES_FILE, problems, TOKEN_COLUMNS) if (d / SAMPLES_FILE).exists() else None
            if lay is None or (tok is None and (d / SAMPLES_FILE).exists()):
                continue
            row = row.iloc[:1].copy()
            if tok is not None:  # the per-token rows are the source: metrics added since the run are filled in
                for k, v in summarize_fidelity(tok, json.loads(row["position_buckets"].iloc[0])).items():
                    row[k] = [v]
            row["run_dir"], row["run_name"], row["method_key"] = str(d), d.name, _method_key(d)
            fidelity.append(row)
            layers.append(lay.assign(run_name=d.name))
            continue
        s = _read(d / SAMPLES_FILE, problems, SAMPLE_COLUMNS) if (d / SAMPLES_FILE).exists() else pd.DataFrame()
        if row is None or s is None:
            continue  # a run with a damaged file is left out whole, never reported half
        row = row.iloc[:1].copy()
        row["run_dir"], row["run_name"], row["method_key"] = str(d), d.name, _method_key(d)
        row["result_config"] = _result_config(d)
        runs.append(row)
        samples.append(s.assign(run_name=d.name))
    runs_df = pd.concat(runs, ignore_index=True) if runs else pd.DataFrame()
    fid_df = pd.concat(fidelity, ignore_index=True) if fidelity else pd.DataFrame()
    relabel(runs_df, fid_df)
    return Collected(runs_df, pd.concat(samples, ignore_index=True) if samples else pd.DataFrame(), problems,
                     fid_df, pd.concat(layers, ignore_index=True) if layers else pd.DataFrame())


def relabel(runs: pd.DataFrame, fidelity: pd.DataFrame) -> None:
    """Labels over evaluation and fidelity runs together, so one method setting has one label in both."""
    frames = [f for f in (runs, fidelity) if not f.empty]
    if not frames:
        return
    labels = _labels(pd.concat([f[["run_name", "method_key"]] for f in frames], ignore_index=True))
    start = 0
    for f in frames:
        f["label"] = labels[start:start + len(f)]
        start += len(f)


def _labels(runs: pd.DataFrame) -> list[str]:
    """The readable head of the run name (`kivi-KIVI-2`, `mixkvq-C2.5`); a suffix where one head covers two
    method settings."""
    base = [name.split("_")[0] for name in runs["run_name"]]
    keys: dict[str, set] = {}
    for b, k in zip(base, runs["method_key"]):
        keys.setdefault(b, set()).add(k)
    return [b if len(keys[b]) == 1 else f"{b}#{k}" for b, k in zip(base, runs["method_key"])]


# ---------------------------------------------------------------- our table


def _num(v) -> float | None:
    if v is None:
        return None
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v


def _pm(p, se) -> str:
    p, se = _num(p), _num(se)
    return "-" if p is None else f"{100 * p:.1f}" + ("" if se is None else f" ± {100 * se:.1f}")


def settings(runs: pd.DataFrame) -> list[str]:
    """Per run, the settings that tell it from another run of the same model, method label, storage and task
    (`seed=1 task.size=20`; '' where no two runs of a cell differ), so that two configs never merge into one row."""
    if "result_config" not in runs:
        return [""] * len(runs)
    configs = [json.loads(c) if isinstance(c, str) else {} for c in runs["result_config"]]
    differing: set[str] = set()
    cells = runs.groupby([k for k in ("model", "label", "storage", "task") if k in runs], sort=False).indices.values()
    for idx in cells:
        members = [configs[i] for i in idx]
        for key in set().union(*members):
            if len({json.dumps(m.get(key), default=str) for m in members}) > 1:
                differing.add(key)
    return [" ".join(f"{k}={c[k]}" for k in sorted(differing) if k in c) for c in configs]


def method_task_table(runs: pd.DataFrame, fidelity: pd.DataFrame | None = None) -> pd.DataFrame:
    """Rows (model, method label, storage, and the settings that tell apart two runs of one cell), a pass@1%
    ± s.e. column per task, then bits and memory (means over tasks; memory only from packed storage), then the
    teacher-forced fidelity of the same method setting when `fidelity` runs are given: KL(bf16 || method), top-1
    agreement and ΔNLL, means over every token of its fidelity runs ('-' where none)."""
    if runs.empty:
        return pd.DataFrame()
    tasks = list(dict.fromkeys(runs["task"]))
    runs = runs.assign(setting=settings(runs))
    out = []
    for (model, label, storage, setting), g in runs.groupby(["model", "label", "storage", "setting"], sort=False):
        row = {"model": model, "method": label, "storage": storage, "setting": setting}
        for t in tasks:
            cell = g[g["task"] == t]
            row[t] = _pm(cell["pass1"].iloc[0], cell["pass1_se"].iloc[0]) if len(cell) else "-"
            if len(cell):
                row[f"n {t}"] = f"{int(cell['n_problems'].iloc[0])}x{int(cell['n_samples'].iloc[0])}"
        payload, stor = g["payload_bits_mean"].map(_num).dropna(), g["storage_bits_mean"].map(_num).dropna()
        row["payload bits"] = f"{payload.mean():.2f}" if len(payload) else "-"
        row["storage bits"] = f"{stor.mean():.2f}" if len(stor) else "-"
        packed = g[g["storage"] == "packed"]
        kv = packed["kv_bytes_vs_bf16"].map(_num).dropna() if "kv_bytes_vs_bf16" in packed else pd.Series()
        peak = packed["peak_mem_bytes"].map(_num).dropna() if "peak_mem_bytes" in packed else pd.Series()
        row["KV/bf16"] = f"{kv.mean():.2f}x" if len(kv) else "-"
        row["peak MiB"] = f"{peak.max() / MIB:.0f}" if len(peak) else "-"
        out.append(row)
    df = pd.DataFrame(out)
    order = ["model", "method", "storage", *(["setting"] if df["setting"].any() else []),
             *tasks, *[f"n {t}" for t in tasks if f"n {t}" in df],
             "payload bits", "storage bits", "KV/bf16", "peak MiB"]
    df = df[order]
    if fidelity is not None and not fidelity.empty:
        pooled = pooled_fidelity(fidelity)
        df = df.merge(pooled, on=["model", "method", "storage"], how="left")
    return df.fillna("-")


def pooled_fidelity(fidelity: pd.DataFrame) -> pd.DataFrame:
    """Per (model, method label, storage): KL, top-1 and ΔNLL weighted by tokens over its fidelity runs."""
    out = []
    for (model, label, storage), g in fidelity.groupby(["model", "label", "storage"], sort=False):
        w = g["n_tokens"].astype(float)
        mean = {k: float((g[k].astype(float) * w).sum() / w.sum()) for k in ("kl_mean", "top1", "dnll")}
        out.append({"model": model, "method": label, "storage": storage, "KL (tf)": f"{mean['kl_mean']:.4f}",
                    "top-1 % (tf)": f"{100 * mean['top1']:.1f}", "ΔNLL (tf)": f"{mean['dnll']:+.4f}"})
    return pd.DataFrame(out)


# ---------------------------------------------------------------- fidelity tables


def _setting(r) -> str:
    return f"{r['task']} {r['reference']} {int(r['reference_length'])}"


FIDELITY_JSON_KEYS = ("method", "nominal_bits", "payload_bits", "storage_bits", "kl_mean", "kl_p95", "top1", "dnll",
                      "dnll_p95", "n_tokens", "n_problems", "kl_mean_answer", "top1_answer", "dnll_answer",
                      "n_tokens_answer", "attn_rel_err_mean", "budget_truncation_rate", "past_eos_share", "model",
                      "task", "reference", "reference_length", "storage")
_FLOATS = ("kl_mean", "kl_p95", "top1", "dnll", "dnll_p95", "kl_mean_answer", "top1_answer", "dnll_answer",
           "attn_rel_err_mean", "budget_truncation_rate", "past_eos_share")


def fidelity_rows(fidelity: pd.DataFrame) -> list[dict]:
    """fidelity.json: one plain row per fidelity run, sorted by setting then storage bits."""
    rows = []
    for _, r in fidelity.iterrows():
        rows.append({
            "method": r["label"], "nominal_bits": str(r["nominal_bits"]),
            "payload_bits": _num(r["payload_bits_mean"]), "storage_bits": _num(r["storage_bits_mean"]),
            **{k: _num(r.get(k)) for k in _FLOATS},
            "n_tokens": int(r["n_tokens"]), "n_problems": int(r["n_problems"]),
            "n_tokens_answer": None if _num(r.get("n_tokens_answer")) is None else int(r["n_tokens_answer"]),
            "model": r["model"],
            "task": r["task"], "reference": r["reference"], "reference_length": int(r["reference_length"]),
            "storage": r["storage"],
        })
    return sorted(rows, key=lambda x: (x["model"], x["task"], x["reference"], x["reference_length"],
                                       -(x["storage_bits"] or 0)))


def fidelity_table(fidelity: pd.DataFrame) -> pd.DataFrame:
    """One row per fidelity run: bits beside KL(bf16 || method) mean and 95th percentile, top-1 agreement, ΔNLL
    (nats per token), the KL and top-1 over the bf16 model's own answers only (before its natural EOS), mean
    attention-output error, problems x mean tokens scored."""
    if fidelity.empty:
        return pd.DataFrame()
    out = []
    for r in fidelity_rows(fidelity):
        f = lambda k, spec, scale=1.0: "-" if r[k] is None else f"{r[k] * scale:{spec}}"  # noqa: E731
        out.append({"model": r["model"], "reference": f"{r['task']} {r['reference']} {r['reference_length']}",
                    "method": r["method"], "nominal": r["nominal_bits"], "payload bits": f("payload_bits", ".2f"),
                    "storage bits": f("storage_bits", ".2f"), "KL mean": f("kl_mean", ".4f"),
                    "KL p95": f("kl_p95", ".4f"), "top-1 %": f("top1", ".1f", 100), "ΔNLL": f("dnll", "+.4f"),
                    "KL answer": f("kl_mean_answer", ".4f"), "top-1 % answer": f("top1_answer", ".1f", 100),
                    "attn err": f("attn_rel_err_mean", ".4f"),
                    "n": f"{r['n_problems']}x{r['n_tokens'] // max(r['n_problems'], 1)}"})  # problems x mean tokens
    return pd.DataFrame(out)


def fidelity_positions(fidelity: pd.DataFrame) -> pd.DataFrame:
    """Mean KL by reference-position bucket, one row per fidelity run (the long-context question)."""
    out = []
    for _, r in fidelity.sort_values(["reference_length", "storage_bits_mean"], ascending=[True, False]).iterrows():
        cells = {"reference": _setting(r), "method": r["label"]}
        for b in json.loads(r["by_position"] or "[]"):
            cells[f"{b['lo']}-{b['hi']}"] = f"{b['kl_mean']:.4f}"
        out.append(cells)
    return pd.DataFrame(out).fillna("-") if out else pd.DataFrame()


def to_markdown(df: pd.DataFrame) -> str:
    return tabulate(df, headers="keys", tablefmt="github", showindex=False, disable_numparse=True)


def to_latex(df: pd.DataFrame, caption: str = "") -> str:
    body = tabulate(df, headers="keys", tablefmt="latex_booktabs", showindex=False, disable_numparse=True)
    body = body.replace("±", r"$\pm$")
    cap = f"\\caption{{{caption}}}\n" if caption else ""
    return f"\\begin{{table}}[t]\n\\centering\n{cap}{body}\n\\end{{table}}\n"


# ---------------------------------------------------------------- the papers' numbers


def load_papers(folder: str | Path) -> pd.DataFrame:
    """Every result CSV of results/papers (the `*_claims.csv` files have other columns and are left out).
    Values stay text as published (`value`), with a numeric copy (`value_num`) for plots."""
    frames = []
    for path in sorted(Path(folder).glob("*.csv")):
        if path.stem.endswith("_claims"):
            continue
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
        df["file"] = path.stem
        frames.append(df)
    if not frames:
        raise FileNotFoundError(f"no paper CSVs in {folder}")
    papers = pd.concat(frames, ignore_index=True)
    papers["value_num"] = pd.to_numeric(papers["value"], errors="coerce")
    return papers


def _ours_for(runs: pd.DataFrame, model: str, dataset: str, method: str) -> tuple[str, str, str]:
    """(pass@1% ± s.e., our label(s), n) of our runs matching one paper cell; pooled over tasks for AIME24-25."""
    models = [m for m, names in PAPER_MODELS.items() if model in names]
    tasks = next((list(t) if isinstance(t, tuple) else [t] for t, names in PAPER_TASKS.items() if dataset in names),
                 None)
    ours = [m for m, names in PAPER_METHODS.items() if method in names]
    if not models or not tasks or not ours or runs.empty:
        return "-", "", ""
    g = runs[runs["model"].isin(models) & runs["task"].isin(tasks) & runs["method"].isin(ours)]
    if g.empty or set(g["task"]) != set(tasks):
        return "-", "", ""
    cells = []
    for (label, setting), h in g.groupby(["label", "setting"], sort=False):  # two settings never pool
        if set(h["task"]) != set(tasks):
            continue
        label = f"{label} ({setting})" if setting else label
        w = h["n_problems"].astype(float)
        p = float((h["pass1"].astype(float) * w).sum() / w.sum())
        se = float(((h["pass1_se"].astype(float) * w) ** 2).sum() ** 0.5 / w.sum())
        cells.append((_pm(p, se), label, f"{int(w.sum())}x{int(h['n_samples'].max())}"))
    if not cells:
        return "-", "", ""
    return tuple(" / ".join(c[i] for c in cells) for i in range(3))


def paper_comparison(runs: pd.DataFrame, papers: pd.DataFrame, file: str) -> pd.DataFrame:
    """One paper table (by CSV stem) with our matching numbers beside each published cell."""
    if file not in PAPER_TABLES:
        raise KeyError(f"unknown paper table {file!r}; valid choices: {sorted(PAPER_TABLES)}")
    metric = PAPER_TABLES[file][1]
    rows = papers[(papers["file"] == file) & (papers["metric"] == metric)]
    runs = runs.assign(setting=settings(runs)) if not runs.empty else runs
    if file in ("kivi_table3", "kvmix_table3"):
        rows = rows[rows["dataset"] == "GSM8K"]
    out = []
    for _, r in rows.iterrows():
        ours, label, n = _ours_for(runs, r["model"], r["dataset"], r["method"])
        paper = r["value"] + (f" ± {r['std']}" if r.get("std") else "")
        out.append({"model": r["model"], "dataset": r["dataset"], "method": r["config"], "bits": r["bits"],
                    "paper": paper, "ours": ours, "our run": label, "n": n})
    return pd.DataFrame(out)


# ---------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless: CI and batch jobs have no display
    import matplotlib.pyplot as plt

    return plt


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not beaten by another with fewer or equal bits and higher or equal accuracy, by bits."""
    front, best = [], -math.inf
    for bits, acc in sorted(points, key=lambda p: (p[0], -p[1])):
        if acc > best:
            front.append((bits, acc))
            best = acc
    return front


def _style(*axes) -> None:
    """A light grid on each panel, and its legend when it has labelled lines."""
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)


def _save(fig, path, **savefig) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120, **savefig)
    _pyplot().close(fig)
    return path


def plot_pareto(runs: pd.DataFrame, path: str | Path, bits: str = "storage_bits_mean"):
    """pass@1 vs stored bits per element, one panel per (model, task), the Pareto front as a line."""
    plt = _pyplot()
    groups = list(runs.groupby(["model", "task"], sort=False)) if not runs.empty else []
    fig, axes = plt.subplots(1, max(1, len(groups)), figsize=(5 * max(1, len(groups)), 4), squeeze=False)
    for ax, ((model, task), g) in zip(axes[0], groups):
        pts = []
        for _, r in g.iterrows():
            x, y, se = _num(r[bits]), _num(r["pass1"]), _num(r["pass1_se"]) or 0.0
            if x is None or y is None:
                continue
            ax.errorbar(x, 100 * y, yerr=100 * se, fmt="o", capsize=3, label=r["label"])
            pts.append((x, 100 * y))
        front = pareto_front(pts)
        if front:
            ax.plot(*zip(*front), "k--", lw=1, alpha=0.6, label="Pareto front")
        ax.set(title=f"{model} / {task}", xlabel="storage bits per KV element", ylabel="pass@1 (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


def context_points(samples: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """Per sample of packed runs: context length (prompt + generated tokens), KV MiB; per problem: tok/s."""
    if samples.empty or runs.empty:
        return pd.DataFrame()
    packed = runs[runs["storage"] == "packed"][["run_name", "label", "model"]]
    s = samples.merge(packed, on="run_name")
    if s.empty or "kv_bytes_final" not in s:
        return pd.DataFrame()
    prompt = s["prompt_tokens"] if "prompt_tokens" in s else 0
    s = s.assign(context=prompt + s["n_tokens"], kv_mib=s["kv_bytes_final"].astype(float) / MIB)
    per_problem = s.groupby(["run_name", "problem_id"])
    s["tok_s"] = per_problem["n_tokens"].transform("sum") / per_problem["gen_seconds"].transform("first")
    return s


def plot_memory_context(samples: pd.DataFrame, runs: pd.DataFrame, path: str | Path):
    """KV-cache MiB and decode tokens/s against context length, one colour per method (packed runs only)."""
    plt = _pyplot()
    pts = context_points(samples, runs)
    fig, (mem, speed) = plt.subplots(1, 2, figsize=(10, 4))
    for (model, label), g in (pts.groupby(["model", "label"], sort=False) if not pts.empty else []):
        g = g.sort_values("context")
        mem.plot(g["context"], g["kv_mib"], "o", ms=3, label=f"{label} ({model})")  # flushes make it non-monotone
        speed.plot(g["context"], g["tok_s"], "o", ms=3, label=f"{label} ({model})")
    mem.set(xlabel="context tokens (prompt + generated)", ylabel="KV cache (MiB, measured)", title="memory vs context")
    speed.set(xlabel="context tokens (prompt + generated)", ylabel="decode tokens/s (per problem)",
              title="throughput vs context")
    _style(mem, speed)
    return _save(fig, path)


def plot_vs_papers(comparison: pd.DataFrame, path: str | Path, title: str = ""):
    """One panel per model x benchmark; in each, every method (colour) as published (solid) beside ours
    (hatched). A cell we have not run is marked "not run", never drawn as a 0 bar."""
    from matplotlib.patches import Patch

    plt = _pyplot()
    c = comparison.copy()
    c["paper_v"] = pd.to_numeric(c["paper"].str.split(" ").str[0], errors="coerce")
    c["ours_v"] = pd.to_numeric(c["ours"].str.split(" ").str[0], errors="coerce")
    c = c.dropna(subset=["paper_v"])
    models, datasets = list(dict.fromkeys(c["model"])) or [""], list(dict.fromkeys(c["dataset"])) or [""]
    methods = list(dict.fromkeys(c["method"]))
    colour = {m: plt.get_cmap("tab20")(i % 20) for i, m in enumerate(methods)}
    fig, axes = plt.subplots(len(models), len(datasets), squeeze=False, sharey=True,
                             figsize=(1.2 + 0.45 * max(3, c.groupby(["model", "dataset"]).size().max() if len(c) else 3)
                                      * len(datasets), 0.9 + 2.4 * len(models)))
    for i, model in enumerate(models):
        for j, dataset in enumerate(datasets):
            ax, cell = axes[i][j], c[(c["model"] == model) & (c["dataset"] == dataset)]
            if cell.empty:
                ax.axis("off")
                continue
            for k, r in enumerate(cell.itertuples()):
                ax.bar(k - 0.2, r.paper_v, 0.4, color=colour[r.method])
                if pd.notna(r.ours_v):
                    ax.bar(k + 0.2, r.ours_v, 0.4, color="white", edgecolor=colour[r.method], hatch="///")
                else:
                    ax.text(k + 0.2, 1, "not run", rotation=90, ha="center", va="bottom", fontsize=6, color="0.45")
            ax.set_xticks([])
            ax.set_title(f"{model} / {dataset}", fontsize=8)
            ax.grid(axis="y", alpha=0.3)
        axes[i][0].set_ylabel("accuracy (%)", fontsize=8)
    handles = [Patch(color=colour[m], label=m) for m in methods]
    handles += [Patch(facecolor="0.6", label="paper"), Patch(facecolor="white", edgecolor="0.3", hatch="///",
                                                           label="ours")]
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path, bbox_inches="tight")


def _fidelity_groups(fidelity: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    if fidelity.empty:
        return []
    keys = fidelity.apply(lambda r: f"{r['model']} / {_setting(r)}", axis=1)
    return [(k, fidelity[keys == k]) for k in dict.fromkeys(keys)]


def plot_fidelity_pareto(fidelity: pd.DataFrame, path: str | Path, bits: str = "storage_bits_mean"):
    """KL(bf16 || method) and top-1 agreement against stored bits per element, one row of panels per model and
    reference setting; the dashed line is the Pareto front (no other point has fewer bits and less KL)."""
    plt = _pyplot()
    groups = _fidelity_groups(fidelity)
    fig, axes = plt.subplots(max(1, len(groups)), 2, figsize=(11, 4.2 * max(1, len(groups))), squeeze=False)
    for (name, g), (kl_ax, top_ax) in zip(groups, axes):
        pts = []
        for i, (_, r) in enumerate(g.iterrows()):
            x, kl, top = _num(r[bits]), _num(r["kl_mean"]), _num(r["top1"])
            if x is None or kl is None:
                continue
            colour = f"C{i % 10}"
            kl_ax.plot(x, max(kl, 1e-6), "o", color=colour, label=r["label"])
            top_ax.plot(x, 100 * top, "o", color=colour, label=r["label"])
            pts.append((x, -max(kl, 1e-6)))
        front = pareto_front(pts)
        if front:
            kl_ax.plot([b for b, _ in front], [-k for _, k in front], "k--", lw=1, alpha=0.6, label="Pareto front")
        kl_ax.set(yscale="log", title=f"{name}: KL(bf16 || method)", xlabel="storage bits per KV element",
                  ylabel="mean KL per token (nats)")
        top_ax.set(title=f"{name}: top-1 agreement", xlabel="storage bits per KV element", ylabel="top-1 (%)")
        for ax in (kl_ax, top_ax):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    return _save(fig, path)


def plot_fidelity_layers(fidelity: pd.DataFrame, layers: pd.DataFrame, path: str | Path):
    """Where the error comes from: per layer, the decode attention output's relative L2 error against exact
    attention over the same history, and the SQNR of the dequantized keys and values; a line per method."""
    plt = _pyplot()
    groups = _fidelity_groups(fidelity)
    fig, axes = plt.subplots(max(1, len(groups)), 3, figsize=(15, 4 * max(1, len(groups))), squeeze=False)
    for (name, g), (err_ax, k_ax, v_ax) in zip(groups, axes):
        for i, (_, r) in enumerate(g.iterrows()):
            lay = layers[layers["run_name"] == r["run_name"]].sort_values("layer") if not layers.empty else layers
            if lay.empty:
                continue
            style = dict(marker="o", ms=3, color=f"C{i % 10}", label=r["label"])
            err_ax.plot(lay["layer"], lay["attn_rel_err"], **style)
            k_ax.plot(lay["layer"], lay["key_sqnr_db"].astype(float), **style)  # None (lossless) is not drawn
            v_ax.plot(lay["layer"], lay["value_sqnr_db"].astype(float), **style)
        err_ax.set(title=f"{name}: attention output error", xlabel="layer", ylabel="relative L2 error vs exact",
                   yscale="log")
        k_ax.set(title="keys: SQNR of dequantized cache", xlabel="layer", ylabel="SQNR (dB)")
        v_ax.set(title="values: SQNR of dequantized cache", xlabel="layer", ylabel="SQNR (dB)")
        _style(err_ax, k_ax, v_ax)
    return _save(fig, path)


def plot_fidelity_positions(fidelity: pd.DataFrame, path: str | Path):
    """Mean KL per reference-position bucket: does the error grow with the length of the context?"""
    plt = _pyplot()
    groups = _fidelity_groups(fidelity)
    fig, axes = plt.subplots(1, max(1, len(groups)), figsize=(6 * max(1, len(groups)), 4.2), squeeze=False)
    for (name, g), ax in zip(groups, axes[0]):
        for i, (_, r) in enumerate(g.iterrows()):
            buckets = json.loads(r["by_position"] or "[]")
            if not buckets:
                continue
            # the middle of the part of each bucket the references reach (tokens per problem in it)
            mid = [b["lo"] + min(b["hi"] - b["lo"], b["n_tokens"] / max(int(r["n_problems"]), 1)) / 2
                   for b in buckets]
            ax.plot(mid, [max(b["kl_mean"], 1e-6) for b in buckets], marker="o", ms=3, color=f"C{i % 10}",
                    label=r["label"])
        ax.set(title=name, xlabel="position in the reference (tokens, bucket middle)", ylabel="mean KL (nats)",
               yscale="log", xscale="log")
        _style(ax)
    return _save(fig, path)

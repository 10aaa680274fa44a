"""The table printed at the end of every run and multirun (gpt-fast style: accuracy next to bits,
bytes, tokens/s and peak memory).

Rows are run rows (run.parquet) with keys: method, label (method and nominal bits or variant, e.g. kivi-KIVI-4;
rows written before it existed fall back to method + nominal_bits), model, task, storage, pass1, pass1_se,
majority, agree_answer, payload_bits_mean, storage_bits_mean, mean_tokens, truncation_rate (samples cut at the token limit),
budget_truncation_rate (samples a KV budget ended: a line under the table when any), kv_bytes_vs_bf16, tokens_per_s, peak_mem_bytes, n_problems,
n_samples, decoding (sampled | greedy: marks the agreement). Missing or null values print as '-'.
"""

from __future__ import annotations

import math

from tabulate import tabulate

MIB = 2**20


def _get(row: dict, key: str):
    v = row.get(key)
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else v


def _fmt(v, spec: str, scale: float = 1.0, suffix: str = "") -> str:
    return "-" if v is None else f"{v * scale:{spec}}{suffix}"


# How the answers compared with bf16's were decoded: sampled answers differ between two bf16 runs by chance.
DECODING_MARK = {"sampled": "s", "greedy": "g"}


def _agree(row: dict) -> str:
    cell = _fmt(_get(row, "agree_answer"), ".1f", 100)
    mark = DECODING_MARK.get(_get(row, "decoding"))
    return cell if cell == "-" or mark is None else f"{cell} {mark}"


def label(row: dict) -> str:
    """What tells two runs of one method apart: `kivi-KIVI-2` and `kivi-KIVI-4`, not `kivi` twice."""
    method, bits = _get(row, "method"), _get(row, "nominal_bits")
    return _get(row, "label") or ("-" if method is None else method if bits is None else f"{method}-{bits}")


def _cells(row: dict) -> dict:
    packed = row.get("storage") != "fake"  # fake storage saves nothing: no memory or speed figures
    p, se = _get(row, "pass1"), _get(row, "pass1_se")
    n_p, n_s = _get(row, "n_problems"), _get(row, "n_samples")
    # Two-line headers keep 13 columns within 120 characters; storage (packed | fake) heads its group.
    return {
        "method": label(row),
        "pass@1\n%": "-" if p is None else f"{100 * p:.1f}" + ("" if se is None else f"±{100 * se:.1f}"),
        "maj\n%": _fmt(_get(row, "majority"), ".1f", 100),
        "agree\n%": _agree(row),
        "trunc\n%": _fmt(_get(row, "truncation_rate"), ".1f", 100),  # long chains of thought hit the token limit
        "mean\ntokens": _fmt(_get(row, "mean_tokens"), ".0f"),
        "payload\nbits": _fmt(_get(row, "payload_bits_mean"), ".2f"),
        "storage\nbits": _fmt(_get(row, "storage_bits_mean"), ".2f"),
        "KV/\nbf16": _fmt(_get(row, "kv_bytes_vs_bf16") if packed else None, ".2f", suffix="x"),
        "tok/s": _fmt(_get(row, "tokens_per_s") if packed else None, ".1f"),
        "peak\nMiB": _fmt(_get(row, "peak_mem_bytes") if packed else None, ".0f", 1 / MIB),
        "n": "-" if n_p is None else f"{n_p}x{n_s}" if n_s is not None else str(n_p),
    }


def _group(row: dict) -> str:
    return " / ".join(_get(row, k) or "-" for k in ("model", "task", "storage"))


def format_summary(rows: list[dict]) -> str:
    """Plain-text table. Model, task and storage are heading lines over their rows (a column each would not
    fit in 120 characters with long hub names); one group gets one heading."""
    if not rows:
        return "(no runs)"
    groups = list(dict.fromkeys(_group(r) for r in rows))
    rows = sorted(rows, key=lambda r: groups.index(_group(r)))  # stable: keeps order inside a group
    cells = [_cells(r) for r in rows]
    align = ["left"] + ["right"] * (len(cells[0]) - 1)
    lines = tabulate(cells, headers="keys", tablefmt="simple", disable_numparse=True, colalign=align).splitlines()
    head = next(i for i, line in enumerate(lines) if set(line) <= {"-", " "}) + 1  # header lines + rule
    out, last = lines[:head], None
    for row, line in zip(rows, lines[head:]):
        if _group(row) != last:
            last = _group(row)
            out.append(f"[{last}]")
        out.append(line)
    if any(_get(r, "agree_answer") is not None and _get(r, "decoding") in DECODING_MARK for r in rows):
        out.append("agree%: final answer equal to the bf16 run's; s = sampled (two bf16 runs also disagree by "
                   "chance), g = greedy. Teacher-forced KL: scripts/fidelity.py")
    budgeted = [r for r in rows if _get(r, "budget_truncation_rate")]
    if budgeted:  # a KV budget (PM-KVQ) ended samples early: never silently
        out.append("KV budget ended: " + ", ".join(
            f"{label(r)} {100 * r['budget_truncation_rate']:.1f}% of samples" for r in budgeted))
    return "\n".join(out)

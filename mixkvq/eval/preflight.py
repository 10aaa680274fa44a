"""Every check a run can make before anything heavy, in seconds, in one pass.

The whole resolved config (the run options, decoding, quantizer numerics, logger, kernels against the device,
the method's values against the model's shape read from its config file without weights), the task files, the
calibration artifacts, every prompt against the context, and the run folder a resume would read (its lock, its
config, the integrity of its parquet files). A refused run creates nothing: the first error is one ConfigError
naming the typeable key, the bad value and what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from kernels import decode_kernel_names, kernel_unavailable
from mixkvq.errors import ConfigError
from mixkvq.eval.models import ModelConfig, ModelFiles, _resolve_device, check_context, read_model_files
from mixkvq.eval.stop_check import STOP_CHECKS
from mixkvq.eval.tasks import Problem, load_task
from mixkvq.kv.graphs import GRAPH_MODES
from mixkvq.kv.methods import METHODS, STORAGE_MODES, Method, ModelShape, build_method, check_choice, method_config
from mixkvq.kv.quantizer import QuantSpec
from mixkvq.kv.storage import check_pack_kernel
from mixkvq.runs.results import RunState, check_saved_config, check_unlocked, run_name, run_state
from mixkvq.runs.sinks import resolve_mode

CACHE_IMPLS = ("harness", "dynamic")  # attention.cache: the method's cache, or transformers' DynamicCache (bf16)


def check_number(key: str, value, kind: type = int, *, low=None, high=None, above=None, nullable=False) -> None:
    """`value` is a `kind` (an int is a fine float; a bool is neither) within [low, high] and above `above`."""
    if value is None and nullable:
        return
    ok = isinstance(value, bool) if kind is bool else (
        isinstance(value, (int, float) if kind is float else kind) and not isinstance(value, bool))
    ok = ok and (low is None or value >= low) and (high is None or value <= high) and (above is None or value > above)
    if not ok:
        bounds = [f">= {low}" if low is not None else "", f"> {above}" if above is not None else "",
                  f"<= {high}" if high is not None else ""]
        what = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[kind]
        rule = " and ".join(b for b in bounds if b)
        raise ConfigError(f"{key}={value!r} is not valid; it must be {what}{' ' + rule if rule else ''}"
                          f"{' or null' if nullable else ''}")


def check_options(cfg: DictConfig) -> None:
    """The run options outside the groups."""
    check_number("seed", cfg.seed, int)
    check_number("cpu_threads", cfg.cpu_threads, int, low=1)
    check_number("grading_workers", cfg.grading_workers, int, low=0)
    check_number("progress", cfg.progress, bool)
    check_number("results_dir", cfg.results_dir, str)
    resolve_mode(cfg.logger.mode)
    check_number("logger.init_timeout_s", cfg.logger.init_timeout_s, float, above=0)
    check_number("hub_timeout_s", cfg.hub_timeout_s, float, above=0)
    check_choice("stop_check", cfg.get("stop_check", "deferred"), STOP_CHECKS)


def generation_kwargs(cfg: DictConfig) -> dict:
    g = cfg.generation
    check_number("generation.do_sample", g.do_sample, bool)
    check_number("generation.max_new_tokens", g.max_new_tokens, int, low=1, nullable=True)
    max_new = g.max_new_tokens if g.max_new_tokens is not None else cfg.model.max_new_tokens
    if not g.do_sample and cfg.task.n_samples != 1:
        raise ConfigError(f"generation.do_sample=false (greedy) gives identical samples; with it set task.n_samples=1, "
                          f"not {cfg.task.n_samples}")
    if g.get("batch_problems", 1) != "auto":
        check_number("generation.batch_problems", g.get("batch_problems", 1), int, low=1)
    check_number("generation.cache_memory_gib", g.get("cache_memory_gib"), float, above=0, nullable=True)
    check_number("generation.cache_memory_fraction", g.get("cache_memory_fraction", 0.85), float, above=0, high=1)
    kwargs = {"do_sample": bool(g.do_sample), "max_new_tokens": max_new}
    if g.do_sample:
        if g.temperature == 0:
            raise ConfigError("generation.temperature=0 is not valid when sampling; it must be > 0 (greedy decoding "
                              "is generation.do_sample=false task.n_samples=1)")
        check_number("generation.temperature", g.temperature, float, above=0)
        check_number("generation.top_p", g.top_p, float, above=0, high=1)
        kwargs.update(temperature=float(g.temperature), top_p=float(g.top_p))
    return kwargs


def check_cache_config(cfg: DictConfig) -> None:
    """The method, quantizer, decode kernel and storage settings every entry point shares, checked without a model."""
    method_config(cfg.method)
    check_number("quant.min_scale", cfg.quant.min_scale, float, above=0)
    QuantSpec.from_config(cfg.quant, torch.float32)
    check_choice("attention.decode_kernel", cfg.attention.decode_kernel, decode_kernel_names())
    check_choice("attention.cuda_graphs", cfg.attention.get("cuda_graphs", "auto"), GRAPH_MODES)
    check_choice("attention.cache", cfg.attention.get("cache", "harness"), CACHE_IMPLS)
    if cfg.attention.get("cache", "harness") == "dynamic" and cfg.method.name != "bf16":
        raise ConfigError(f"attention.cache=dynamic is transformers' unquantized DynamicCache: it runs with "
                          f"method=bf16, not method={cfg.method.name}")
    check_number("attention.graph_bucket_tokens", cfg.attention.get("graph_bucket_tokens", 512), int, low=1)
    check_pack_kernel(cfg.quant.get("pack_kernel", "auto"))
    check_choice("storage", cfg.storage, STORAGE_MODES)


def check_static(cfg: DictConfig) -> None:
    """Checks that need neither the model's files nor the data: fail fast, before any loading."""
    check_options(cfg)
    check_cache_config(cfg)
    ModelConfig.from_cfg(cfg.model)
    generation_kwargs(cfg)


def check_artifacts(cfg: DictConfig) -> None:
    """The calibration artifact this config reads exists, is readable and was made for this model (its shape is
    compared once the model's config is read): for sweeps planned where the model's files are not at hand."""
    from mixkvq.calib.artifacts import load_artifact

    method = method_config(cfg.method)
    if METHODS.get(method.name).needs_artifact(method):
        load_artifact(method.name, method.calibration_dir, method.artifact, cfg.model)


@dataclass
class Checked:
    """Everything the run needs that the checks produced, so nothing is read twice."""

    files: ModelFiles
    shape: ModelShape
    method: Method
    problems: list[Problem]
    prompts: dict[str, str]  # problem id -> prompt text
    prompt_tokens: dict[str, int]
    gen: dict
    label: str
    run_dir: Path
    state: RunState


def model_shape(mc: ModelConfig, files: ModelFiles) -> ModelShape:
    """The shape ModelShape.of would read from the loaded model, from its config file."""
    c = files.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    return ModelShape(c.num_hidden_layers, kv, c.num_attention_heads, head_dim, getattr(torch, mc.dtype),
                      _resolve_device(mc.device))


def preflight(cfg: DictConfig) -> Checked:
    """Every check, in the order a user fixes things: config, model files, method, data, context, run folder."""
    from mixkvq.eval.protocol import build_prompt

    check_static(cfg)
    gen = generation_kwargs(cfg)
    mc = ModelConfig.from_cfg(cfg.model)
    shape_device = _resolve_device(mc.device)
    for key, name in (("attention.decode_kernel", cfg.attention.decode_kernel),
                      ("quant.pack_kernel", cfg.quant.get("pack_kernel", "auto"))):
        why = kernel_unavailable(name, shape_device)
        if why:
            raise ConfigError(f"{key}={name!r} cannot run on this run's device ({shape_device}): {why}; "
                              "choose auto or torch")
    g = cfg.generation
    if g.get("batch_problems", 1) == "auto" and g.get("cache_memory_gib") is None and shape_device.type != "cuda":
        raise ConfigError(f"generation.batch_problems=auto on {shape_device} needs generation.cache_memory_gib (the "
                          "cache's budget in GiB); only a CUDA device reports its free memory")
    files = read_model_files(mc, cfg.hub_timeout_s)
    shape = model_shape(mc, files)
    method = build_method(cfg, shape)
    problems = load_task(cfg.task, cfg.hub_timeout_s)
    prompts = {p.id: build_prompt(files.tokenizer, p.question, cfg.prompt, mc.think_prefix) for p in problems}
    tokens = {pid: len(files.tokenizer(t, add_special_tokens=False).input_ids) for pid, t in prompts.items()}
    longest = max(tokens, key=tokens.get)
    check_context(files.max_context, mc.name, tokens[longest], gen["max_new_tokens"], longest)
    method.check_prompts(min(tokens.values()))
    label = f"{cfg.method.name}-{method.nominal_bits}"
    if cfg.attention.get("cache", "harness") == "dynamic":
        label = f"{cfg.method.name}-dynamic"  # transformers' cache: its own row in every table
    run_dir = Path(cfg.results_dir) / run_name(cfg, label)
    state = RunState()
    if run_dir.is_dir():  # a resume: the files it reads must be this run's and intact, and no job may hold it
        check_unlocked(run_dir)
        check_saved_config(run_dir, cfg)
        state = run_state(run_dir)
    return Checked(files, shape, method, problems, prompts, tokens, gen, label, run_dir, state)

"""Offline calibration, Hydra-configured like run.py; writes the artifact a run of the method then loads.

    python scripts/calibrate.py method=pmkvq model=deepseek-r1-distill-7b     # sensitivity, IP, key scales
    python scripts/calibrate.py method=kvmix                                   # gradient-norm layer scores
    python scripts/calibrate.py method=mixkvq                                  # Optuna τ search
    python scripts/calibrate.py method=kvmix data_files=../shared/data/gsm8k/train.jsonl   # local text

Artifacts: <method.calibration_dir>/<model>/<method>/{artifact.json, config.yaml}, with the data hash.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from mixkvq.errors import ConfigError

CALIBRATORS = {}


def calibrator(name: str):
    def add(fn):
        CALIBRATORS[name] = fn
        return fn

    return add


def _dataset(cfg: DictConfig, name: str) -> dict:
    if name not in cfg.datasets:
        raise ConfigError(f"calibration dataset {name!r} is unknown; valid: {sorted(cfg.datasets)}")
    return {"name": name, **OmegaConf.to_container(cfg.datasets[name], resolve=True)}


@calibrator("kvmix")
def _kvmix(cfg, loaded, method) -> tuple[dict, dict]:
    from mixkvq.calibration import kvmix_profile, load_texts, prompt_ids

    p = cfg.method.profile
    if p.mode not in ("single_backward", "per_layer"):
        raise ConfigError(f"method.profile.mode={p.mode!r} is not valid; choose one of ['single_backward', 'per_layer']")
    texts, data = load_texts(_dataset(cfg, p.dataset), cfg.data_files, int(p.prompts), cfg.calib_seed)
    prompts = prompt_ids(loaded.tokenizer, texts, int(p.max_tokens))
    return kvmix_profile(loaded.model, loaded.tokenizer, prompts, p.mode), data


@calibrator("pmkvq")
def _pmkvq(cfg, loaded, method) -> tuple[dict, dict]:
    from mixkvq.calibration import load_texts, pmkvq_rep_scales, pmkvq_sensitivity, token_chunks

    c = cfg.method.calib
    texts, data = load_texts(_dataset(cfg, c.dataset), cfg.data_files, int(c.samples) * 64, cfg.calib_seed)
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


@calibrator("mixkvq")
def _mixkvq(cfg, loaded, method) -> tuple[dict, dict]:
    import hashlib

    from mixkvq.calibration import codes_bits, mixkvq_search
    from mixkvq.grading import grade_many
    from mixkvq.methods import build_method
    from mixkvq.protocol import build_prompt, generate_samples
    from mixkvq.tasks import load_task, task_config

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


def calibrate(cfg: DictConfig, loaded=None) -> Path:
    """Calibrate cfg.method on cfg.model (or on an already `loaded` model, as tests do) and write the artifact."""
    import torch

    from mixkvq.artifacts import artifact_dir, save_artifact
    from mixkvq.methods import ModelShape, build_method, method_config
    from mixkvq.models import load_model

    name = cfg.method.name
    if name not in CALIBRATORS:
        raise ConfigError(f"method {name!r} needs no calibration; calibrate one of {sorted(CALIBRATORS)}")
    method_config(cfg.method)
    loaded = loaded or load_model(cfg.model)
    if loaded.device.type == "cpu":
        torch.set_num_threads(cfg.cpu_threads)
    shape = ModelShape.of(loaded.model)
    # Build the method without the artifact this run is about to make (only its settings are needed).
    skip = {"pmkvq": {"allocation": "uniform", "reparameterize": False}, "kvmix": {"layer_bits": {
        "key": [2] * shape.layers, "value": [2] * shape.layers}}, "mixkvq": {"thresholds": "paper"}}[name]
    method = build_method(cfg, shape, method=OmegaConf.merge(cfg.method, skip))
    start = time.perf_counter()
    payload, data = CALIBRATORS[name](cfg, loaded, method)
    seconds = time.perf_counter() - start
    folder = Path(cfg.out_dir) if cfg.out_dir else artifact_dir(cfg.method.calibration_dir, cfg.model.name, name)
    path = save_artifact(folder, method=name, model=cfg.model.name, shape=shape, payload=payload, data=data,
                         config_yaml=OmegaConf.to_yaml(cfg, resolve=True), seconds=seconds)
    print(f"{name} calibration of {cfg.model.name}: {seconds:.1f} s on {loaded.device}; data sha256 "
          f"{data['sha256'][:12]}; wrote {path}")
    return path


@hydra.main(config_path="../configs", config_name="calibrate", version_base=None)
def main(cfg: DictConfig):
    try:
        return calibrate(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

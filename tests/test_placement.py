"""Models spread over devices (mixkvq/eval/placement.py): each cache layer is built where its layer runs, a cache built
for another placement is refused, offloaded layers (weights on `meta`, run elsewhere by accelerate) decode the same
tokens as the model in one piece, and bad placement configs stop with the valid choices. CPU only: layers
"elsewhere" are on the meta device, or offloaded to disk and run on the CPU."""

from __future__ import annotations

import pytest
import torch
from accelerate import dispatch_model
from accelerate.hooks import AlignDevicesHook, add_hook_to_module, remove_hook_from_submodules

from mixkvq.errors import ConfigError
from mixkvq.eval import placement
from mixkvq.eval.models import _check_gpu_count, model_config
from mixkvq.kv.attention import bind
from mixkvq.kv.methods import ModelShape
from tests.tiny import build, generate, random_prompts, tiny_model

# Every method, with settings that need no calibration artifact.
METHODS = {
    "bf16": [],
    "kivi": [],
    "mixkvq": [],
    "kvmix": ["method.layer_bits={key: [3, 2], value: [4, 2]}"],
    "pmkvq": ["method.allocation=uniform", "method.reparameterize=false", "method.group_size=64"],
}
HOST_COUNTERS = (torch.int64, torch.float64, torch.bool)  # per-row (and head) lengths and accounting: on the host


def host_counter(t: torch.Tensor) -> bool:
    return t.dim() <= 2 and t.dtype in HOST_COUNTERS


def tensors_of(obj, seen=None):
    """Every tensor reachable from a cache layer's own state (not the cache or modules it is bound to)."""
    seen = set() if seen is None else seen
    if id(obj) in seen or obj is None:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            yield from tensors_of(x, seen)
    elif isinstance(obj, dict):
        for x in obj.values():
            yield from tensors_of(x, seen)
    elif hasattr(obj, "__dict__") and type(obj).__module__.split(".")[0] in ("mixkvq", "baselines", "kernels"):
        for key, x in vars(obj).items():
            if key not in ("method", "cache", "decode_fn"):
                yield from tensors_of(x, seen)


def split_cpu_meta(model):
    """Layer 1 'runs on meta': an accelerate hook on it says so (nothing is run there)."""
    add_hook_to_module(model.model.layers[1], AlignDevicesHook(execution_device="meta"))
    return model


@pytest.mark.parametrize("name", sorted(METHODS))
def test_each_cache_layer_lives_on_its_layers_device(name):
    model = split_cpu_meta(tiny_model("llama", layers=2))
    shape = ModelShape.of(model)
    assert shape.layer_devices == (torch.device("cpu"), torch.device("meta")) and shape.device.type == "cpu"
    method = build(name, METHODS[name], model=model)
    cache = method.new_cache(3)
    for layer, want in zip(cache.layers, ("cpu", "meta")):
        # the stores' counts (and PM-KVQ's row widths) kept beside the data for the decode kernels (CUDA-graph
        # steps read them there)
        beside = {id(getattr(getattr(layer, s).store, a, None)) for s in ("key_stream", "value_stream")
                  for a in ("device_count", "device_row_bits")}
        data = [t for t in tensors_of(layer) if not host_counter(t) or id(t) in beside]
        assert data, f"{name}: layer {layer.layer_idx} holds no data tensors"
        assert {t.device.type for t in data} == {want}, (name, layer.layer_idx, {t.device for t in data})
        host = [t for t in tensors_of(layer) if host_counter(t) and id(t) not in beside]
        assert all(t.device.type == "cpu" for t in host)
    assert method.device == shape.device  # the builder's per-layer device is put back


def test_bind_refuses_a_cache_built_for_another_placement_and_picks_kernels_per_layer():
    model = tiny_model("llama", layers=2)
    one_device = build("kivi", model=model).new_cache(1)
    split_cpu_meta(model)
    with pytest.raises(ValueError, match=r"cache layer 1 lives on cpu but the model runs that layer on meta"):
        with bind(model, one_device):
            pass
    cache = build("kivi", model=model).new_cache(1)
    with bind(model, cache, "auto"):
        from kernels.reference import decode_attention

        assert all(layer.decode_fn is decode_attention for layer in cache.layers)  # CPU and meta: the reference


@pytest.mark.parametrize("name", ["bf16", "kivi", "mixkvq"])
def test_layers_offloaded_by_accelerate_decode_the_same_tokens(name, tmp_path):
    """Layer 1's weights go to disk (meta in the model) and run on the CPU through accelerate's hooks: the cache
    must follow the execution device, not the weights, and greedy tokens must not change."""
    model = tiny_model("llama", layers=2)
    ids = torch.stack(random_prompts([40, 40], seed=3))
    want, _ = generate(model, build(name, model=model), ids, max_new_tokens=24)
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    dispatch_model(model, device_map, offload_dir=str(tmp_path))
    try:
        assert model.model.layers[1].self_attn.k_proj.weight.device.type == "meta"
        assert placement.layer_devices(model) == [torch.device("cpu")] * 2
        got, cache = generate(model, build(name, model=model), ids, max_new_tokens=24)
    finally:
        remove_hook_from_submodules(model)
    assert torch.equal(got, want)
    assert all(layer.key_stream.window.data.device.type == "cpu" for layer in cache.layers)
    assert cache.snapshots and float(cache.snapshots[-1]["code_bits"].sum()) > 0  # accounting ran on every step


def test_device_map_configs_name_the_bad_value_and_the_choices():
    assert placement.check_device_map("balanced") == "balanced"
    assert placement.check_device_map({"model.layers.0": "cuda:1", "lm_head": 0, "model.norm": "cpu"}) == \
        {"model.layers.0": "cuda:1", "lm_head": 0, "model.norm": "cpu"}
    with pytest.raises(ConfigError, match=r"unknown model.device_map 'everywhere'; valid choices: .*'auto'.*'balanced'"):
        placement.check_device_map("everywhere")
    with pytest.raises(ConfigError, match=r"model.device_map\['lm_head'\]='gpu1' is not a device"):
        placement.check_device_map({"lm_head": "gpu1"})
    with pytest.raises(ConfigError, match=r"model.device_map\['lm_head'\]=-1"):
        placement.check_device_map({"lm_head": -1})
    assert placement.check_max_memory({0: "1GiB", "cuda:1": 2048, "cpu": "2GiB"}) == \
        {0: 2**30, 1: 2048, "cpu": 2 * 2**30}
    with pytest.raises(ConfigError, match=r"model.max_memory key 'gpu0' is not a device"):
        placement.check_max_memory({"gpu0": "1GiB"})
    with pytest.raises(ConfigError, match=r"model.max_memory\[0\]='lots' is not a size"):
        placement.check_max_memory({0: "lots"})
    with pytest.raises(ConfigError, match="model.gpus must be a positive integer, got 0"):
        model_config("deepseek-r1-distill-32b", gpus=0)
    with pytest.raises(ConfigError, match=r"device_map\['model.layers.0'\]='tpu'"):
        model_config("deepseek-r1-distill-32b", device_map={"model.layers.0": "tpu"})


def test_where_the_model_goes_and_what_is_refused_before_loading():
    cpu = torch.device("cpu")
    assert placement.device_map_arg("auto", cpu, "auto") == "cpu"  # a strategy spreads over GPUs only
    assert placement.device_map_arg("cpu", cpu, {"": "cpu"}) == {"": "cpu"}  # a mapping is taken as given
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="maps modules to GPUs but CUDA is not available"):
            placement.device_map_arg("auto", cpu, {"model.layers.0": 0, "lm_head": "cpu"})
    assert placement.is_strategy("auto") and not placement.is_strategy({"": 0}) and not placement.is_strategy("cuda:0")
    mc = model_config("deepseek-r1-distill-32b")
    with pytest.raises(ConfigError, match=r"needs model.gpus=2 GPUs but \d+ are visible; .*model.gpus="):
        _check_gpu_count(mc, "auto")
    _check_gpu_count(mc, {"": "cpu"})  # an explicit mapping is the user's choice


def test_peak_memory_on_cpu_is_the_process_rss_without_a_per_gpu_split():
    peak, kind, per_device = placement.peak_memory([torch.device("cpu")])
    assert peak > 0 and kind == "cpu_rss" and per_device is None


def test_where_a_model_runs_is_not_part_of_a_runs_identity():
    from omegaconf import OmegaConf

    from mixkvq.config import load_config
    from mixkvq.runs.results import config_hash, twin_key

    cfg = load_config(["model=deepseek-r1-distill-32b"])
    moved = load_config(["model=deepseek-r1-distill-32b", "model.gpus=4", "model.device_map=balanced",
                         "model.max_memory={0: 70GiB}"])
    assert config_hash(cfg) == config_hash(moved) and twin_key(cfg) == twin_key(moved)
    older = OmegaConf.to_container(cfg, resolve=True)  # a run written before the placement keys existed
    for key in ("device_map", "max_memory", "gpus"):
        del older["model"][key]
    assert config_hash(older) == config_hash(cfg)
    assert config_hash(load_config(["model=deepseek-r1-distill-32b", "model.dtype=float16"])) != config_hash(cfg)

"""The CUDA decode kernel over fragment pages (kernels/cuda/fragment_decode.cuh), registered as `cuda`.

It serves layers whose key and value stores are uniform 2/4-bit formats that fit a `FragmentPageLayout`
(KIVI-2, KIVI-4; mixkvq/kv/paged.py converts a fresh layer's stores when the kernel is bound). The extension is
compiled by `torch.utils.cpp_extension.load` the first time a CUDA layer asks for it (about 45 s on an H200;
cached by torch afterwards) and imported lazily, so machines without a GPU or a compiler never touch it.

Per call the extension reads each row's counters (kept on the host by the stores), plans the splits and makes two
launches (splits, merge); the lengths travel in the kernel's parameters, so no copy precedes them.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from mixkvq.kv.layout import PAGE_TOKENS, PackingFormat

SOURCE_DIR = Path(__file__).resolve().parent / "cuda"
SOURCE = "fragment_decode.cu"  # its binding (MixKVQ's tiered kernel builds apart: kernels/tiered.py)
HEADER = "fragment_decode.cuh"
TIERED_HEADER = "tiered_decode.cuh"
MAX_ROWS = 512  # fpd::MAX_ROWS
MAX_GQA = 8  # fpd::HEADS
LOG2E = math.log2(math.e)


@dataclass(frozen=True)
class Tuning:
    """How a call is split (values, not globals: benchmarks pass their own)."""

    ctas_per_sm: int = 3  # resident CTAs of the split kernel per SM (fpd MIN_CTAS)
    max_splits: int = 64  # most main splits per (row, KV head)
    tail_tokens_min: int = 32  # fewest tail tokens per CTA (a tail split's warps take one token each in turn)
    variant: int = 0  # benchmarks only: another (pages in flight, CTAs per SM) build of the KIVI-2 kernel, see VARIANTS


# Benchmark variants of the KIVI-2 bf16 kernel (fragment_decode.cu): variant -> (pages in flight per warp, CTAs per SM).
VARIANTS = {0: (4, 3), 1: (4, 4), 2: (6, 3), 3: (3, 4), 4: (2, 5), 5: (8, 2)}


DEFAULT_TUNING = Tuning()


def _arch(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"{major}.{minor}a" if major == 9 else f"{major}.{minor}"


_EXTS: dict = {}


def build_extension(name: str, source: str, device: torch.device | None = None):
    """A decode kernel's compiled extension (built on first use for the current GPU, cached by torch after)."""
    if name not in _EXTS:
        from torch.utils.cpp_extension import load

        device = device or torch.device("cuda", torch.cuda.current_device())
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", _arch(device))
        _EXTS[name] = load(name=name, sources=[str(SOURCE_DIR / source)], extra_include_paths=[str(SOURCE_DIR)],
                           extra_cuda_cflags=["-O3", "-std=c++17", "-lineinfo"], verbose=False)
    return _EXTS[name]


def extension(device: torch.device | None = None):
    """The fragment kernel's compiled extension."""
    return build_extension("fragment_decode", SOURCE, device)


def compiler_available() -> bool:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    return shutil.which("nvcc") is not None or (cuda_home is not None and (Path(cuda_home) / "bin" / "nvcc").exists())


def _page_layout(layer):
    ks = layer.key_stream.store
    lay = ks.layout() if ks is not None else None
    return lay.page if lay is not None and lay.format is PackingFormat.FRAGMENT_PAGES else None


# Why a layout kernel declines a cache that it could have served had it been bound before its first tokens (it lays
# out a cache's stores when bound): `auto` warns of this one, since it is a caller's mistake, not a format.
FILLED_BEFORE_BIND = "the cache already holds tokens in another layout (bind a cache before its first tokens)"


def supports(layer) -> str | None:
    """Why the CUDA kernel cannot serve this layer (None: it can, after `prepare`)."""
    if _page_layout(layer) is None:
        # Imported here: the page stores build on mixkvq.kv.storage, which kernels do not load (tests/test_layering.py).
        from mixkvq.kv.paged import page_problems

        problems = page_problems(layer)
        if problems:
            return "; ".join(problems)
        if int(layer.key_stream.tokens().max()) > 0:
            return FILLED_BEFORE_BIND
    ks, vs = layer.key_stream, layer.value_stream
    if (ks.sink is None) != (vs.sink is None):
        return "keys and values need the same sink"
    if ks.window.data.dtype not in (torch.bfloat16, torch.float16):
        return f"model dtype {ks.window.data.dtype} is not bf16 or fp16"
    groups = getattr(layer, "query_groups", None)  # set by attention.bind from the attention module
    if groups is not None and groups > MAX_GQA:
        return f"{groups} query heads per KV head (the kernel holds at most {MAX_GQA})"
    if len(layer.pad) > MAX_ROWS:
        return f"batch {len(layer.pad)} is over {MAX_ROWS} rows"
    if not ks.window.data.is_cuda:
        return "the cache is not on a CUDA device"
    if not compiler_available():
        return "no CUDA compiler (nvcc) to build the kernel"
    return None


def prepare(layer) -> None:
    """Put a fresh layer's stores into fragment pages (once, when the kernel is bound)."""
    if _page_layout(layer) is None:
        from mixkvq.kv.paged import to_pages

        to_pages(layer)


def fragment_decode(query: torch.Tensor, layer, scaling: float, tuning: Tuning = DEFAULT_TUNING,
                    keys_only: bool = False) -> torch.Tensor:
    """query [B, Hq, 1, D] -> [B, 1, Hq, D] (keys_only: the splits' [max, sum] partials of the key product).

    The host work is the extension's: it reads the layer's per-row counters and plans the splits in C++. In a step
    a CUDA graph records (`layer.graph_tokens` set), the kernel reads the counters from the device instead, and the
    splits are planned for the bucket's tokens and for the longest tail such a step can have (`graph_bounds`).
    """
    ks, vs = layer.key_stream, layer.value_stream
    pl = ks.store.layout().page
    kb, vb = ks.store.buffers(), vs.store.buffers()  # one page buffer; each store's own token counts
    sink = ks.sink
    device_counts, bounds = [], []
    if layer.graph_tokens is not None:
        device_counts = [ks.store.device_count, vs.store.device_count, ks.window.device_lens]
        if sink is not None:
            device_counts.append(sink.device_lens)
        bounds = list(graph_bounds(layer))
    return extension(query.device).decode(
        query, kb["pages"], ks.window.data, vs.window.data, sink.data if sink is not None else None,
        vs.sink.data if sink is not None else None, sink.lens if sink is not None else None, kb["lens"],
        vb["lens"], ks.window.lens, scaling * LOG2E, pl.key_bits, pl.value_bits, pl.value_group,
        [tuning.ctas_per_sm, tuning.max_splits, tuning.tail_tokens_min], keys_only, tuning.variant,
        device_counts, bounds)


def graph_bounds(layer) -> tuple[int, int]:
    """(full pages, tail tokens) that a replayed step's splits are planned for: the bucket's pages, and the sink plus
    the longest window such a step attends over (`Stream.replay_release`: at most `quiet_below` tokens) plus a
    partial page. The tail is what lies beyond the pages both stores have filled, so it is at most that."""
    ks, vs = layer.key_stream, layer.value_stream
    window = max(ks.quiet_below, vs.quiet_below)
    return layer.graph_tokens // PAGE_TOKENS, ks.sink_tokens + window + PAGE_TOKENS - 1


def decode_attention(module, query: torch.Tensor, layer, scaling: float) -> torch.Tensor:
    """The registered `cuda` decode kernel (same signature as the PyTorch reference)."""
    return fragment_decode(query, layer, scaling)


def read_pages(pages: torch.Tensor, ctas: int) -> torch.Tensor:
    """Gate 1: stream every byte of a page buffer once (a read-and-fold microbenchmark)."""
    return extension(pages.device).read_pages(pages, ctas)


# ---- offline compilation (no GPU needed): tests and SASS reading ---------------------------------------------

# Instantiations compiled without torch, for the CPU compile test and `scripts/kernel_sass.py`-style reading.
OFFLINE_KERNELS = {  # template arguments as the binding instantiates them (WARPS 4, STAGES 4, MIN_CTAS 3)
    "kivi2_bf16_d128": "__nv_bfloat16, 128, 2, 2, 32, 4, 4, false, 3",
    "kivi4_bf16_d128": "__nv_bfloat16, 128, 4, 4, 32, 4, 4, false, 3",
    "kivi2_fp16_d64": "__half, 64, 2, 2, 32, 4, 4, false, 3",
    "kivi2_keys_only": "__nv_bfloat16, 128, 2, 2, 32, 4, 4, true, 3",
}
# MixKVQ's tiered kernel (tiered_decode.cuh) as the binding instantiates it (three CTAs per SM: 168 registers).
OFFLINE_TIERED_KERNELS = {  # (T, D, value bits, value group, warps, ring pages, CTAs per SM) as tiered_decode.cu
    "mixkvq_v2_bf16_d128": "__nv_bfloat16, 128, 2, 32, 4, 2, 3",
    "mixkvq_v4_bf16_d128": "__nv_bfloat16, 128, 4, 32, 4, 2, 3",
    "mixkvq_v4_fp16_d64": "__half, 64, 4, 32, 4, 4, 3",
}


def nvcc_path() -> Path | None:
    """nvcc from CUDA_HOME, PATH or the `nvidia-cuda-nvcc` wheel (the test extra installs it)."""
    found = shutil.which("nvcc")
    if found:
        return Path(found)
    try:
        import nvidia.cu13 as cu  # the wheel's namespace package

        cand = Path(list(cu.__path__)[0]) / "bin" / "nvcc"
        return cand if cand.exists() else None
    except ImportError:
        return None


def page_layout_asserts() -> list[str]:
    """static_asserts that the kernel's page offsets (`fpd::Page`) are the Python layout's (`FragmentPageLayout`),
    for every width the kernels are built for, values-only pages included: a disagreement fails the compile."""
    from kernels.tiered import ring_key_cap
    from mixkvq.kv.layout import PAGE_BITS, PAGE_HEAD_DIMS, FragmentPageLayout

    out = []
    for d in PAGE_HEAD_DIMS:
        for kb in (None, *PAGE_BITS):
            for vb in PAGE_BITS:
                lay = FragmentPageLayout(d, kb, vb, 32)
                sec = lay.sections()
                page = f"fpd::Page<{d}, {kb or 0}, {vb}, 32>"
                for member, name in (("KS", "key_scale"), ("KZ", "key_zero"), ("VC", "value_codes"),
                                     ("VS", "value_scale"), ("VZ", "value_zero")):
                    out.append(f'static_assert({page}::{member} == {sec[name][0]}, "{page}::{member}: the Python '
                               f'layout says {sec[name][0]}");')
                out.append(f'static_assert({page}::BYTES == {lay.page_bytes}, "{page}::BYTES");')
    for d in PAGE_HEAD_DIMS:  # the tiered kernel's key pages staged in its ring (larger ones read in place)
        out.append(f"static_assert(fpd::TieredSmem<{d}, 2, 32, 4>::KEY_CAP == {ring_key_cap(d)}, \"ring key cap\");")
    return out


def compile_offline(out_dir: Path, arch: str = "sm_90a") -> tuple[Path, str]:
    """Compile the kernels of OFFLINE_KERNELS and OFFLINE_TIERED_KERNELS to a cubin; returns (cubin, ptxas
    report)."""
    import subprocess

    nvcc = nvcc_path()
    if nvcc is None:
        raise FileNotFoundError("nvcc not found (pip install nvidia-cuda-nvcc, or set CUDA_HOME)")
    out_dir.mkdir(parents=True, exist_ok=True)
    tu = out_dir / "fragment_offline.cu"
    lines = [f'#include "{HEADER}"', f'#include "{TIERED_HEADER}"']
    for args in OFFLINE_KERNELS.values():
        lines.append(f"template __global__ void fpd::fpd_split<{args}>(const __grid_constant__ fpd::Params);")
    for args in OFFLINE_TIERED_KERNELS.values():
        lines.append(f"template __global__ void fpd::tpd_split<{args}>(const __grid_constant__ fpd::Params);")
    lines.append("template __global__ void fpd::fpd_merge<__nv_bfloat16, 128, fpd::merge_groups<128>()>"
                 "(const __grid_constant__ fpd::Params);")
    lines += page_layout_asserts()
    tu.write_text("\n".join(lines) + "\n")
    cubin = out_dir / "fragment_offline.cubin"
    cmd = [str(nvcc), "-std=c++17", f"-arch={arch}", "-cubin", "-O3", "-Xptxas", "-v", f"-I{SOURCE_DIR}",
           "-o", str(cubin), str(tu)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if res.returncode != 0:
        raise RuntimeError(f"nvcc failed:\n{res.stderr[-4000:]}")
    return cubin, res.stderr

// PyTorch binding of the fragment-page decode kernel (fragment_decode.cuh): one call per layer and decode step.
// Built by torch.utils.cpp_extension.load at first use (kernels/fragment.py).
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <vector>

#include "fragment_decode.cuh"
#include "tiered_decode.cuh"

namespace {

constexpr int WARPS = 4;
constexpr int STAGES = 4;     // pages in flight per warp
constexpr int MIN_CTAS = 3;   // resident CTAs per SM the register budget is cut for (168 registers)

// A split kernel's launch (its shared memory: `smem` bytes, at least what the CTA's combine takes), then the merge.
// The kernel is a template argument, so that each has its own `configured`.
template <typename T, int D, auto split>
void launch_splits(size_t smem, bool merge, fpd::Params& p, int batch, cudaStream_t stream) {
  smem = std::max(smem, size_t(WARPS) * fpd::HEADS * (2 + D) * sizeof(float));
  static bool configured = false;  // one attribute call per kernel
  if (!configured) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(split, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
    configured = true;
  }
  split<<<dim3(p.n_splits, p.n_kv, batch), WARPS * 32, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (merge) {
    constexpr int SG = fpd::merge_groups<D>();
    fpd::fpd_merge<T, D, SG><<<batch * p.n_kv * p.gqa, D * SG, (p.n_splits + SG * D) * sizeof(float), stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename T, int D, int KB, int VB, int VG, bool KEYS_ONLY, int ST = STAGES, int MC = MIN_CTAS>
void launch(fpd::Params& p, int batch, cudaStream_t stream) {
  constexpr size_t page = fpd::Page<D, KB, VB, VG>::BYTES, key_page = fpd::Page<D, KB, VB, VG>::KEY_BYTES;
  launch_splits<T, D, fpd::fpd_split<T, D, KB, VB, VG, WARPS, ST, KEYS_ONLY, MC>>(
      size_t(WARPS) * ST * (KEYS_ONLY ? key_page : page), !KEYS_ONLY, p, batch, stream);
}

template <typename T, int D, int VB, int VG>
void launch_tiered(fpd::Params& p, int batch, cudaStream_t stream) {
  constexpr int TIERED_MIN_CTAS = 2;  // 254 registers without spills (3 spill)
  launch_splits<T, D, fpd::tpd_split<T, D, VB, VG, WARPS, TIERED_MIN_CTAS>>(size_t(WARPS) * fpd::TieredSmem<D>::WARP,
                                                                          true, p, batch, stream);
}

template <typename T, int D>
void dispatch_bits(fpd::Params& p, int batch, cudaStream_t s, int kb, int vb, int vg) {
#define FPD_CASE(KB, VB, VG)                                          \
  if (kb == KB && vb == VB && vg == VG) {                             \
    if constexpr (D % VG == 0) return launch<T, D, KB, VB, VG, false>(p, batch, s); \
  }
  FPD_CASE(2, 2, 32) FPD_CASE(4, 4, 32) FPD_CASE(2, 4, 32) FPD_CASE(4, 2, 32)
  FPD_CASE(2, 2, 64) FPD_CASE(4, 4, 64) FPD_CASE(2, 2, 128) FPD_CASE(4, 4, 128)
#undef FPD_CASE
  TORCH_CHECK(false, "fragment decode: no kernel for key bits ", kb, ", value bits ", vb, ", value group ", vg);
}

int64_t page_bytes(int d, int kb, int vb, int vg) {
  auto up = [](int64_t n) { return (n + 15) / 16 * 16; };
  const int64_t ncg = d / vg;
  const int64_t dk = kb ? d : 0;  // a values-only page (kb = 0) has empty key sections
  return up(32LL * dk * kb / 8) + 2 * up(dk * 2) + up(32LL * d * vb / 8) + 2 * up(32 * ncg * 2);
}

}  // namespace

// How a call is split over CTAs. Main splits: the count whose waves of resident CTAs finish soonest (waves x pages
// per split), fewer splits on ties (each writes a partial the merge reads). Tail (its warps take one token each in
// turn, so a long tail in one CTA is the call's critical path): per (row, KV head), as many CTAs of at least
// `tail_min` tokens as fit the slots the main splits leave idle in their last wave, or, when none are idle (the
// tail starts a wave of its own), as fit one wave; at most 8. Returns (pages per main split, tail tokens per split).
std::pair<int, int> plan_splits(int64_t pairs, int64_t full_pages, int64_t tail_tokens, int64_t sms,
                                int64_t ctas_per_sm, int64_t max_splits, int64_t tail_min) {
  const int64_t slots = sms * ctas_per_sm;
  int64_t best = -1, pps = std::max<int64_t>(full_pages, 1), main_ctas = 0;
  for (int64_t n = 1; n <= max_splits; ++n) {
    const int64_t per = (full_pages + n - 1) / n;
    if (per == 0) break;
    const int64_t cost = (pairs * n + slots - 1) / slots * per;
    if (best < 0 || cost < best) { best = cost; pps = per; main_ctas = pairs * n; }
  }
  pairs = std::max<int64_t>(pairs, 1);
  const int64_t idle = (main_ctas + slots - 1) / slots * slots - main_ctas;
  const int64_t room = idle >= pairs ? idle / pairs : slots / pairs;
  const int64_t want = (tail_tokens + tail_min - 1) / std::max<int64_t>(tail_min, 1);
  const int64_t tail_ctas = std::max<int64_t>(1, std::min<int64_t>({8, room, want}));
  const int64_t tail = std::max<int64_t>(tail_min, (tail_tokens + tail_ctas - 1) / tail_ctas);
  return {int(pps), int(tail)};
}

std::vector<int64_t> plan(int64_t pairs, int64_t full_pages, int64_t tail_tokens, int64_t sms, int64_t ctas_per_sm,
                          int64_t max_splits, int64_t tail_min) {
  auto r = plan_splits(pairs, full_pages, tail_tokens, sms, ctas_per_sm, max_splits, tail_min);
  return {r.first, r.second};
}

int sm_count(int device) {
  static int counts[64] = {};
  if (counts[device] == 0) C10_CUDA_CHECK(cudaDeviceGetAttribute(&counts[device], cudaDevAttrMultiProcessorCount, device));
  return counts[device];
}

namespace {

// What every call sets alike: the query, windows and sink, heads, and each row's counts (from the host tensors, or
// the device tensors of a step a CUDA graph records). Returns (most whole units of `unit` tokens, most tail tokens)
// over the rows, the splits' planning input.
std::pair<int, int> set_common(fpd::Params& p, const torch::Tensor& q, int n_kv, const torch::Tensor& kwin,
                               const torch::Tensor& vwin, const c10::optional<torch::Tensor>& ksink,
                               const c10::optional<torch::Tensor>& vsink,
                               const c10::optional<torch::Tensor>& sink_lens, const torch::Tensor& key_store_lens,
                               const torch::Tensor& value_store_lens, const torch::Tensor& key_window_lens,
                               double scale_log2, const std::vector<torch::Tensor>& device_counts,
                               const std::vector<int64_t>& bounds, int unit) {
  const int batch = q.size(0), hq = q.size(1);
  TORCH_CHECK(batch <= fpd::MAX_ROWS, "fragment decode: batch ", batch, " > ", fpd::MAX_ROWS);
  TORCH_CHECK(q.stride(3) == 1);
  for (const auto* t : {&key_store_lens, &value_store_lens, &key_window_lens})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == torch::kInt64 && t->is_contiguous() && t->numel() == batch,
                "fragment decode: per-row counts are int64 host tensors of the batch size");
  p.q = q.data_ptr(); p.q_sb = q.stride(0); p.q_sh = q.stride(1);
  p.kwin = kwin.data_ptr(); p.kw_sb = kwin.stride(0); p.kw_sh = kwin.stride(1); p.kw_st = kwin.stride(2);
  p.vwin = vwin.data_ptr(); p.vw_sb = vwin.stride(0); p.vw_sh = vwin.stride(1); p.vw_st = vwin.stride(2);
  if (ksink.has_value()) {
    p.ksink = ksink->data_ptr(); p.ksk_sb = ksink->stride(0); p.ksk_sh = ksink->stride(1); p.ksk_st = ksink->stride(2);
    p.vsink = vsink->data_ptr(); p.vsk_sb = vsink->stride(0); p.vsk_sh = vsink->stride(1); p.vsk_st = vsink->stride(2);
  } else {
    p.ksink = p.kwin; p.vsink = p.vwin;
  }
  p.gqa = hq / n_kv;
  TORCH_CHECK(p.gqa * n_kv == hq && p.gqa <= fpd::HEADS, "fragment decode: ", hq, " query heads over ", n_kv,
              " KV heads (at most ", fpd::HEADS, " per KV head)");
  p.n_kv = n_kv;
  p.scale_log2 = static_cast<float>(scale_log2);
  int max_full = 0, max_tail = 0;
  if (!device_counts.empty()) {
    // A step a CUDA graph records: the kernel reads the counts from these device tensors at every replay, and the
    // splits cover the bounds the caller planned for (kernels/fragment.py graph_bounds).
    TORCH_CHECK(device_counts.size() == (sink_lens.has_value() ? 4u : 3u) && bounds.size() == 2,
                "fragment decode: device counts (key store, value store, key window[, sink]) and bounds");
    for (const auto& t : device_counts)
      TORCH_CHECK(t.is_cuda() && t.scalar_type() == torch::kInt64 && t.is_contiguous() && t.numel() == batch,
                  "fragment decode: device counts are int64 CUDA tensors of the batch size");
    p.dev_kq = device_counts[0].data_ptr<int64_t>();
    p.dev_vq = device_counts[1].data_ptr<int64_t>();
    p.dev_kw = device_counts[2].data_ptr<int64_t>();
    p.dev_sink = device_counts.size() == 4 ? device_counts[3].data_ptr<int64_t>() : nullptr;
    max_full = int(bounds[0]);
    max_tail = int(bounds[1]);
  } else {
    const int64_t* kq = key_store_lens.data_ptr<int64_t>();
    const int64_t* vq = value_store_lens.data_ptr<int64_t>();
    const int64_t* kw = key_window_lens.data_ptr<int64_t>();
    const int64_t* sk = sink_lens.has_value() ? sink_lens->data_ptr<int64_t>() : nullptr;
    for (int b = 0; b < batch; ++b) {
      const int sink = sk ? int(sk[b]) : 0, total = int(kq[b] + kw[b]);
      p.lens[b] = make_int4(sink, int(kq[b]), int(vq[b]), total);
      const int full = int(std::min(kq[b], vq[b])) / unit;
      max_full = std::max(max_full, full);
      max_tail = std::max(max_tail, sink + total - full * unit);
    }
  }
  return {max_full, max_tail};
}

// The splits for the call's (whole units, tail tokens), and the partials and output they write.
torch::Tensor plan_and_allocate(fpd::Params& p, const torch::Tensor& q, std::pair<int, int> extent,
                                const std::vector<int64_t>& tuning, bool keys_only, torch::Tensor& part_o,
                                torch::Tensor& part_ml) {
  TORCH_CHECK(tuning.size() == 3, "fragment decode: tuning is (CTAs per SM, most splits, fewest tail tokens)");
  const int batch = q.size(0), d = q.size(3);
  const auto split = plan_splits(int64_t(batch) * p.n_kv, extent.first, extent.second, sm_count(q.get_device()),
                                 tuning[0], tuning[1], tuning[2]);
  p.pages_per_split = split.first;
  p.tail_per_split = split.second;
  p.n_main = (extent.first + p.pages_per_split - 1) / p.pages_per_split;
  const int n_tail = keys_only ? 0 : (extent.second + p.tail_per_split - 1) / p.tail_per_split;
  p.n_splits = std::max(p.n_main + n_tail, 1);
  auto f32 = q.options().dtype(torch::kFloat32);
  part_o = torch::empty({batch, p.n_kv, p.n_splits, fpd::HEADS, d}, f32);
  part_ml = torch::empty({batch, p.n_kv, p.n_splits, fpd::HEADS, 2}, f32);
  auto out = torch::empty({batch, 1, q.size(1), d}, q.options());
  p.part_o = part_o.data_ptr<float>();
  p.part_ml = part_ml.data_ptr<float>();
  p.out = out.data_ptr();
  return out;
}

}  // namespace

// q [B, Hq, 1, D]; pages [B, H, NP, W] int32; windows and sinks [B, H, T, D]; per-row token counts as int64 host
// tensors [B] (sink, key store, value store, key window; the layer's own counters, read here so the Python side
// does no arithmetic); returns [B, 1, Hq, D]. `tuning`: CTAs per SM, most splits, fewest tail tokens per split
// (kernels/fragment.py Tuning); keys_only times the key product alone.
torch::Tensor decode(torch::Tensor q, torch::Tensor pages, torch::Tensor kwin, torch::Tensor vwin,
                     c10::optional<torch::Tensor> ksink, c10::optional<torch::Tensor> vsink,
                     c10::optional<torch::Tensor> sink_lens, torch::Tensor key_store_lens,
                     torch::Tensor value_store_lens, torch::Tensor key_window_lens,
                     double scale_log2, int64_t key_bits, int64_t value_bits, int64_t value_group,
                     std::vector<int64_t> tuning, bool keys_only, int64_t variant,
                     std::vector<torch::Tensor> device_counts, std::vector<int64_t> bounds) {
  const int batch = q.size(0), d = q.size(3);
  TORCH_CHECK(pages.is_contiguous() && pages.scalar_type() == torch::kInt32);
  TORCH_CHECK(pages.size(3) * 4 == page_bytes(d, key_bits, value_bits, value_group), "fragment decode: page size");
  const c10::cuda::CUDAGuard guard(q.device());
  fpd::Params p{};
  p.pages = pages.data_ptr<int32_t>();
  p.pg_sb = pages.stride(0);
  p.pg_sh = pages.stride(1);
  const auto extent = set_common(p, q, pages.size(1), kwin, vwin, ksink, vsink, sink_lens, key_store_lens,
                                 value_store_lens, key_window_lens, scale_log2, device_counts, bounds,
                                 fpd::PAGE_TOKENS);
  torch::Tensor part_o, part_ml;
  auto out = plan_and_allocate(p, q, extent, tuning, keys_only, part_o, part_ml);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const bool bf16 = q.scalar_type() == torch::kBFloat16;
  TORCH_CHECK(bf16 || q.scalar_type() == torch::kHalf, "fragment decode: bf16 or fp16 queries");
#define FPD_DTYPE(T, D) dispatch_bits<T, D>(p, batch, stream, key_bits, value_bits, value_group);
  const bool kivi2 = bf16 && d == 128 && key_bits == 2 && value_bits == 2 && value_group == 32;
  TORCH_CHECK(variant == 0 || kivi2, "kernel variants: KIVI-2 bf16 head_dim 128 only");
  if (keys_only) {  // gate 2 only: KIVI-2 keys, bf16, head_dim 128
    TORCH_CHECK(kivi2, "keys_only: KIVI-2 bf16 head_dim 128 only");
    launch<__nv_bfloat16, 128, 2, 2, 32, true>(p, batch, stream);
  } else if (variant != 0) {  // benchmark-only (STAGES, MIN_CTAS) settings, timed side by side with the default
    using B16 = __nv_bfloat16;
    switch (variant) {
      case 1: launch<B16, 128, 2, 2, 32, false, 4, 4>(p, batch, stream); break;
      case 2: launch<B16, 128, 2, 2, 32, false, 6, 3>(p, batch, stream); break;
      case 3: launch<B16, 128, 2, 2, 32, false, 3, 4>(p, batch, stream); break;
      case 4: launch<B16, 128, 2, 2, 32, false, 2, 5>(p, batch, stream); break;
      case 5: launch<B16, 128, 2, 2, 32, false, 8, 2>(p, batch, stream); break;
      default: TORCH_CHECK(false, "kernel variant ", variant, " unknown (0-5)");
    }
  } else if (d == 128) {
    if (bf16) { FPD_DTYPE(__nv_bfloat16, 128) } else { FPD_DTYPE(__half, 128) }
  } else {
    TORCH_CHECK(d == 64, "fragment decode: head_dim 64 or 128");
    if (bf16) { FPD_DTYPE(__nv_bfloat16, 64) } else { FPD_DTYPE(__half, 64) }
  }
#undef FPD_DTYPE
  return keys_only ? part_ml : out;
}

// MixKVQ: keys in tiered blocks (pool [B, H, words] int32, offsets [B, H, blocks] int64 in words, `block_tokens`
// per block), values in values-only fragment pages [B, H, NP, W]; the rest as `decode`. Main splits run over whole
// blocks of both stores.
torch::Tensor tiered_decode(torch::Tensor q, torch::Tensor pool, torch::Tensor offsets, torch::Tensor vpages,
                            torch::Tensor kwin, torch::Tensor vwin, c10::optional<torch::Tensor> ksink,
                            c10::optional<torch::Tensor> vsink, c10::optional<torch::Tensor> sink_lens,
                            torch::Tensor key_store_lens, torch::Tensor value_store_lens,
                            torch::Tensor key_window_lens, double scale_log2, int64_t block_tokens,
                            int64_t value_bits, int64_t value_group, std::vector<int64_t> tuning,
                            std::vector<torch::Tensor> device_counts, std::vector<int64_t> bounds) {
  const int batch = q.size(0), d = q.size(3);
  TORCH_CHECK(pool.scalar_type() == torch::kInt32 && pool.stride(2) == 1 && offsets.scalar_type() == torch::kInt64 &&
              offsets.stride(2) == 1 && vpages.is_contiguous() && vpages.scalar_type() == torch::kInt32,
              "tiered decode: pool int32, offsets int64, value pages int32");
  TORCH_CHECK(vpages.size(3) * 4 == page_bytes(d, 0, value_bits, value_group), "tiered decode: value page size");
  TORCH_CHECK(block_tokens % fpd::PAGE_TOKENS == 0, "tiered decode: blocks of whole pages");
  const c10::cuda::CUDAGuard guard(q.device());
  fpd::Params p{};
  p.pages = vpages.data_ptr<int32_t>(); p.pg_sb = vpages.stride(0); p.pg_sh = vpages.stride(1);
  p.pool = pool.data_ptr<int32_t>(); p.pool_sb = pool.stride(0); p.pool_sh = pool.stride(1);
  p.offsets = offsets.data_ptr<int64_t>(); p.off_sb = offsets.stride(0); p.off_sh = offsets.stride(1);
  p.block_pages = int(block_tokens / fpd::PAGE_TOKENS);
  const auto extent = set_common(p, q, vpages.size(1), kwin, vwin, ksink, vsink, sink_lens, key_store_lens,
                                 value_store_lens, key_window_lens, scale_log2, device_counts, bounds,
                                 int(block_tokens));
  torch::Tensor part_o, part_ml;
  auto out = plan_and_allocate(p, q, extent, tuning, false, part_o, part_ml);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const bool bf16 = q.scalar_type() == torch::kBFloat16;
  TORCH_CHECK(bf16 || q.scalar_type() == torch::kHalf, "tiered decode: bf16 or fp16 queries");
#define TPD_CASE(T, D, VB, VG) \
  if (d == D && value_bits == VB && value_group == VG) return launch_tiered<T, D, VB, VG>(p, batch, stream), out;
  if (bf16) {
    TPD_CASE(__nv_bfloat16, 128, 2, 32) TPD_CASE(__nv_bfloat16, 128, 4, 32)
    TPD_CASE(__nv_bfloat16, 64, 2, 32) TPD_CASE(__nv_bfloat16, 64, 4, 32)
  } else {
    TPD_CASE(__half, 128, 2, 32) TPD_CASE(__half, 128, 4, 32) TPD_CASE(__half, 64, 2, 32) TPD_CASE(__half, 64, 4, 32)
  }
#undef TPD_CASE
  TORCH_CHECK(false, "tiered decode: no kernel for head_dim ", d, ", value bits ", value_bits, ", value group ",
              value_group);
}

// Gate 1: read every page of the given rows once (16-byte loads) and fold them into one word per CTA.
__global__ void stream_read(const int4* __restrict__ pages, int64_t n16, int64_t per_cta, int* __restrict__ sink) {
  const int64_t first = blockIdx.x * per_cta, last = min(first + per_cta, n16);
  int4 acc = make_int4(0, 0, 0, 0);
  for (int64_t i = first + threadIdx.x; i < last; i += blockDim.x) {
    int4 v;
    asm volatile("ld.global.cs.v4.s32 {%0,%1,%2,%3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(pages + i));
    acc.x ^= v.x; acc.y ^= v.y; acc.z ^= v.z; acc.w ^= v.w;
  }
  int x = acc.x ^ acc.y ^ acc.z ^ acc.w;
  for (int o = 16; o > 0; o >>= 1) x ^= __shfl_xor_sync(0xffffffffu, x, o);
  if ((threadIdx.x & 31) == 0) atomicXor(sink, x);
}

torch::Tensor read_pages(torch::Tensor pages, int64_t ctas) {
  const c10::cuda::CUDAGuard guard(pages.device());
  TORCH_CHECK(pages.is_contiguous() && (pages.numel() * pages.element_size()) % 16 == 0);
  auto sink = torch::zeros({1}, pages.options().dtype(torch::kInt32));
  const int64_t n16 = pages.numel() * pages.element_size() / 16;
  const int64_t per = (n16 + ctas - 1) / ctas;
  stream_read<<<ctas, 512, 0, c10::cuda::getCurrentCUDAStream()>>>(reinterpret_cast<const int4*>(pages.data_ptr()),
                                                                    n16, per, sink.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return sink;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode", &decode, "decode attention over fragment pages");
  m.def("tiered_decode", &tiered_decode, "decode attention over MixKVQ's tiered key blocks and value pages");
  m.def("read_pages", &read_pages, "stream every byte of a page buffer once (bandwidth gate)");
  m.def("plan", &plan, "(pages per main split, tail tokens per split) for a call's shape");
}

// Host side shared by the decode kernels' bindings (fragment_decode.cu, tiered_decode.cu): launch settings, the
// split planner, and the arguments every call sets alike.
#pragma once

#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <vector>

#include "fragment_decode.cuh"

namespace fpd_host {

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

inline int64_t page_bytes(int d, int kb, int vb, int vg) {
  auto up = [](int64_t n) { return (n + 15) / 16 * 16; };
  const int64_t ncg = d / vg;
  const int64_t dk = kb ? d : 0;  // a values-only page (kb = 0) has empty key sections
  return up(32LL * dk * kb / 8) + 2 * up(dk * 2) + up(32LL * d * vb / 8) + 2 * up(32 * ncg * 2);
}


// How a call is split over CTAs. Main splits: the count whose waves of resident CTAs finish soonest (waves x pages
// per split), fewer splits on ties (each writes a partial the merge reads). Tail (its warps take one token each in
// turn, so a long tail in one CTA is the call's critical path): per (row, KV head), as many CTAs of at least
// `tail_min` tokens as fit the slots the main splits leave idle in their last wave, or, when none are idle (the
// tail starts a wave of its own), as fit one wave; at most 8. Returns (pages per main split, tail tokens per split).
inline std::pair<int, int> plan_splits(int64_t pairs, int64_t full_pages, int64_t tail_tokens, int64_t sms,
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

inline std::vector<int64_t> plan(int64_t pairs, int64_t full_pages, int64_t tail_tokens, int64_t sms,
                                 int64_t ctas_per_sm, int64_t max_splits, int64_t tail_min) {
  auto r = plan_splits(pairs, full_pages, tail_tokens, sms, ctas_per_sm, max_splits, tail_min);
  return {r.first, r.second};
}

inline int sm_count(int device) {
  static int counts[64] = {};
  if (counts[device] == 0)
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&counts[device], cudaDevAttrMultiProcessorCount, device));
  return counts[device];
}

// What every call sets alike: the query, windows and sink, heads, and each row's counts (from the host tensors, or
// the device tensors of a step a CUDA graph records). Returns (most whole units of `unit` tokens, most tail tokens)
// over the rows, the splits' planning input.
inline std::pair<int, int> set_common(fpd::Params& p, const torch::Tensor& q, int n_kv, const torch::Tensor& kwin,
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
inline torch::Tensor plan_and_allocate(fpd::Params& p, const torch::Tensor& q, std::pair<int, int> extent,
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

}  // namespace fpd_host

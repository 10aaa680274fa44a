// Decode attention over MixKVQ's tiered key blocks (mixkvq/kv/layout.py TieredPageLayout) and values-only fragment
// pages: the fragment kernel (fragment_decode.cuh) with its key product run once per tier.
//
// One CTA per (split, KV head, row). A main split is a run of whole blocks (block_pages pages of 32 tokens); a warp
// takes one block at a time. Per block, the header's permutation gathers the GQA group's query columns into each
// tier's B fragments, once, in the warp's shared memory. Per page, every tier runs as a uniform key tile of its
// (padded) channel count into the same score accumulator:
//   full precision: the raw 16-bit values are the A fragments as stored;
//   4-bit and 2-bit: codes become 16-bit floats by lop3, the page's scales fold into the query (q' = q * s) and the
//   zeros give one bias row per tier (z . q), as in the fragment kernel.
// A tier's padding channels hold zero values, codes, scales and zeros, so the query columns they meet add nothing.
// The page's values (a values-only fragment page) and the softmax are the fragment kernel's (`Accum`). Pages stream
// through a per-warp ring of shared-memory slots with cp.async, STAGES - 1 pages ahead (`TieredSmem`). Tail splits are
// the fragment kernel's, with stored keys decoded element by element from the blocks (`TieredKeys`).
#pragma once

#include "fragment_decode.cuh"

namespace fpd {

constexpr int TIERS = 3;  // full precision, 4-bit, 2-bit (mixkvq/kv/layout.py TIER_WIDTHS)

// A block's tiers, from its counts: channels, padded channels, first slot in the permutation, words per lane of a
// 16-token tile, and the byte offset of each section within a page (TieredPageLayout.page_sections).
struct Tiers {
  int n[TIERS], c[TIERS], start[TIERS], words[TIERS];
  int code[TIERS], scale[TIERS], zero[TIERS];  // section offsets (scale, zero: quantized tiers only)
  int page_bytes;

  __host__ __device__ static constexpr int bits(int tier) { return tier == 0 ? 16 : (tier == 1 ? 4 : 2); }

  __device__ __forceinline__ explicit Tiers(uint32_t counts) {
    int at = 0, slot = 0;
#pragma unroll
    for (int i = 0; i < TIERS; ++i) {
      n[i] = (counts >> (8 * i)) & 0xFF;
      c[i] = (n[i] + 15) / 16 * 16;
      start[i] = slot;
      slot += n[i];
      const int cw = (c[i] * bits(i) + 63) / 64 * 64 / bits(i);  // tile_channels
      words[i] = cw * bits(i) / 64;
      code[i] = at;
      at += PAGE_TOKENS * cw * bits(i) / 8;
      scale[i] = at;
      zero[i] = at + (i ? 2 * c[i] : 0);
      at += i ? 4 * c[i] : 0;
    }
    page_bytes = at;
  }
};

// A tier's entry of a per-tier array by selects: a runtime index would put the array in local memory.
__device__ __forceinline__ int sel(const int (&a)[TIERS], int tier) {
  return tier == 0 ? a[0] : (tier == 1 ? a[1] : a[2]);
}

template <int D>
__device__ __forceinline__ int header_words() { return (D + 16) / 4; }

// The block of row b, head h holding stored token u, and the page of u within it.
__device__ __forceinline__ const int32_t* tier_block(const Params& p, int b, int h, int k) {
  return p.pool + b * p.pool_sb + h * p.pool_sh + p.offsets[b * p.off_sb + h * p.off_sh + k];
}

// Stored keys of the tail from the tiered blocks: DPL channels from d0 of token u, exactly as the reference
// dequantizes them (code * scale + zero in fp32, rounded to the model dtype; full precision: the raw value).
template <typename T, int D>
struct TieredKeys {
  __device__ __forceinline__ static int whole(const Params& p, int kq, int vq) {
    const int bt = p.block_pages * PAGE_TOKENS;
    return min(kq, vq) / bt * bt;
  }

  template <int DPL>
  __device__ static void load(const Params& p, const int32_t*, int b, int h, int u, int d0, float (&k)[DPL]) {
    const int bt = p.block_pages * PAGE_TOKENS;
    const int32_t* blk = tier_block(p, b, h, u / bt);
    const uint8_t* perm = reinterpret_cast<const uint8_t*>(blk);
    const Tiers tr(static_cast<uint32_t>(blk[D / 4]));
    const char* pg = reinterpret_cast<const char*>(blk + header_words<D>()) + ((u % bt) / PAGE_TOKENS) * tr.page_bytes;
    const int row = u % PAGE_TOKENS, m = row >> 4, rr = row & 15;
#pragma unroll
    for (int j = 0; j < DPL; ++j) {
      int slot = 0;
#pragma unroll 1  // unrolled, the search's loads held registers enough to spill the kernel at 3 CTAs per SM
      for (int i = 0; i < D; ++i) slot = perm[i] == d0 + j ? i : slot;
      const int tier = slot < tr.start[1] ? 0 : (slot < tr.start[2] ? 1 : 2);
      const int idx = slot - sel(tr.start, tier), col = idx & 15, kk = idx >> 4;
      const int reg = (rr >> 3) | ((col >> 3) << 1), half = col & 1;
      const int lane = (rr & 7) * 4 + ((col & 7) >> 1);
      const int bits = tier == 0 ? 16 : (tier == 1 ? 4 : 2), rpw = 16 / bits, r = kk * 4 + reg;
      const uint32_t* words = reinterpret_cast<const uint32_t*>(pg + sel(tr.code, tier));
      const uint32_t word = words[(m * 32 + lane) * sel(tr.words, tier) + r / rpw];
      const uint32_t code = (word >> (16 * half + (r % rpw) * bits)) & ((1u << bits) - 1u);
      if (tier == 0) {
        const uint16_t raw = static_cast<uint16_t>(code);
        k[j] = Num<T>::to_f(*reinterpret_cast<const T*>(&raw));
      } else {
        const int at = ((col & 7) >> 1) * (sel(tr.c, tier) / 4) + kk * 4 + half + 2 * (col >> 3);  // channel_meta_order
        const T* s = reinterpret_cast<const T*>(pg + sel(tr.scale, tier));
        const T* z = reinterpret_cast<const T*>(pg + sel(tr.zero, tier));
        k[j] = Num<T>::to_f(Num<T>::from_f(__fadd_rn(__fmul_rn(float(code), Num<T>::to_f(s[at])),
                                                     Num<T>::to_f(z[at]))));
      }
    }
  }
};

// One quantized tier of one page into the scores (two 16-token tiles) and the bias: the fragment kernel's key
// product over `nk` k-steps of this tier's tile, the query fragments from the warp's gather `qf` (this tier's).
template <typename T, int BITS, int KK>
__device__ __forceinline__ void tier_scores(const char* pg, const Tiers& tr, int tier, const uint32_t* qf, int lane,
                                            int g, int t, float (&s)[2][4], float (&s2)[2][4],
                                            float (&bias)[2][4]) {
  constexpr bool BF16 = sizeof(T) == 2 && Num<T>::MANT == 7;
  constexpr int RPW = Unpack<T, BITS>::RPW;
  const int nk = tr.c[tier] / 16, w = tr.words[tier];
  const uint32_t* kc = reinterpret_cast<const uint32_t*>(pg + tr.code[tier]);
  const uint32_t* ksc = reinterpret_cast<const uint32_t*>(pg + tr.scale[tier]) + t * (tr.c[tier] / 8);
  const uint32_t* kzr = reinterpret_cast<const uint32_t*>(pg + tr.zero[tier]) + t * (tr.c[tier] / 8);
#pragma unroll
  for (int kk = 0; kk < KK; ++kk) {
    if (kk >= nk) break;
    const uint2 qq = *reinterpret_cast<const uint2*>(qf + (kk * 32 + lane) * 2);
    {
      uint32_t a[4] = {g == 0 ? kzr[2 * kk] : 0u, 0u, g == 0 ? kzr[2 * kk + 1] : 0u, 0u};
      mma16816(bias[kk & 1], a, qq.x, qq.y, BF16);
    }
    const uint32_t q0 = mul2<T>(qq.x, ksc[2 * kk]), q1 = mul2<T>(qq.y, ksc[2 * kk + 1]);
#pragma unroll
    for (int m = 0; m < 2; ++m) {
      const uint32_t word = kc[(m * 32 + lane) * w + kk * 4 / RPW];
      uint32_t a[4];
#pragma unroll
      for (int reg = 0; reg < 4; ++reg) a[reg] = Unpack<T, BITS>::get(word, (kk * 4 + reg) % RPW);
      mma16816(kk & 1 ? s2[m] : s[m], a, q0, q1, BF16);
    }
  }
}

// A warp's shared memory in the main splits: a ring of STAGES page slots, then the block's query fragments.
// A slot: the page's key block (its global address) and tier counts, the block's permutation (first page only), the
// value page, and the key page when it holds at most KEY_CAP bytes (D x 32: 8 bits per key element with scales, zeros
// and padding; at D = 128 MixKVQ's pages at 2.3 average key bits take about 2.6 KB, at 3.4 bits up to 4 KB). A page
// over the cap, a block with many full-precision channels, is read from global memory where it lies, by the same
// code through a generic pointer.
template <int D, int VB, int VG, int STAGES>
struct TieredSmem {
  using PV = Page<D, 0, VB, VG>;
  static constexpr int META = 16, PERM = META, VAL = PERM + D, KEY = VAL + PV::BYTES;
  static constexpr int KEY_CAP = D * PAGE_TOKENS;
  static constexpr int SLOT = KEY + KEY_CAP;
  static constexpr int QF = (D / 16 + 2) * 32 * 2 * 4;  // k-steps of the tiers: at most D / 16 + 2 after padding
  static constexpr int WARP = STAGES * SLOT + QF;
  static_assert(SLOT % 16 == 0 && VAL % 16 == 0 && KEY % 16 == 0, "cp.async moves 16-byte chunks");
};

template <int D, int VB, int VG>
constexpr int tiered_warp_smem(int ring) {
  return ring * TieredSmem<D, VB, VG, 1>::SLOT + TieredSmem<D, VB, VG, 1>::QF;
}

// The warp's blocks in order (k0, k0 + step, ...): the current one's address and counts, the next one's address
// and its counts word in flight, the offset of the one after in flight. Two dependent loads per block, which would
// stall the warp where it fetches the block's first page, are so issued a block ahead.
template <int D>
struct BlockQueue {
  const int64_t* off;
  const int32_t* base;
  const int32_t *cur, *next;
  uint32_t cur_counts, next_counts;
  int64_t after;
  int k0, step, blocks;

  __device__ __forceinline__ BlockQueue(const Params& p, int b, int h, int k0_, int step_, int blocks_)
      : k0(k0_), step(step_), blocks(blocks_) {
    off = p.offsets + b * p.off_sb + h * p.off_sh;
    base = p.pool + b * p.pool_sb + h * p.pool_sh;
    cur = base + off[k0];
    cur_counts = static_cast<uint32_t>(cur[D / 4]);
    next = blocks > 1 ? base + off[k0 + step] : cur;
    next_counts = blocks > 1 ? static_cast<uint32_t>(next[D / 4]) : 0u;
    after = off[k0 + min(2, blocks - 1) * step];
  }

  // On to the warp's block n (n >= 1, in order).
  __device__ __forceinline__ void advance(int n) {
    cur = next; cur_counts = next_counts;
    next = base + after;
    if (n + 1 < blocks) next_counts = static_cast<uint32_t>(next[D / 4]);
    after = off[k0 + min(n + 2, blocks - 1) * step];
  }
};

template <typename T, int D, int VB, int VG, int WARPS, int STAGES, int MIN_CTAS = 1>
__global__ void __launch_bounds__(WARPS * 32, MIN_CTAS) tpd_split(const __grid_constant__ Params p) {
  using PV = Page<D, 0, VB, VG>;
  using SM = TieredSmem<D, VB, VG, STAGES>;
  constexpr bool BF16 = sizeof(T) == 2 && Num<T>::MANT == 7;
  constexpr int KK = D / 16;
  extern __shared__ __align__(16) char smem[];
  const int split = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  if (split >= p.n_main) {
    tail_split<T, D, 0, VB, VG, WARPS, TieredKeys<T, D>>(p, b, h, split - p.n_main, smem);
    return;
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int4 L = row_lens(p, b);
  const int BP = p.block_pages;
  const int blocks = min(L.y, L.z) / (BP * PAGE_TOKENS);
  const int first = split * p.pages_per_split;  // here: blocks per split
  const int last = min(first + p.pages_per_split, blocks);
  const int k0 = first + warp;
  const int mine = last > k0 ? (last - k0 + WARPS - 1) / WARPS : 0;  // blocks of this warp
  const int pages = mine * BP;
  char* ring = smem + warp * SM::WARP;
  uint32_t* qf = reinterpret_cast<uint32_t*>(ring + STAGES * SM::SLOT);  // [k-steps of the tiers][32 lanes][2]
  const T* q = reinterpret_cast<const T*>(p.q) + b * p.q_sb + (h * p.gqa + g) * p.q_sh;  // head g of the group
  const char* vrow = reinterpret_cast<const char*>(p.pages + b * p.pg_sb + h * p.pg_sh);
  Accum<T, D, VB, VG> acc;
  if (pages == 0) {
    acc.template write<WARPS>(p, b, h, split, smem, warp, g, t, false);
    return;
  }

  BlockQueue<D> queue(p, b, h, k0, WARPS, mine);
  int fetch_bytes = Tiers(queue.cur_counts).page_bytes;
  auto fetch = [&](int i) {  // page i of the warp into its slot
    const int n = i / BP, j = i % BP;
    if (j == 0 && n > 0) {
      queue.advance(n);
      fetch_bytes = Tiers(queue.cur_counts).page_bytes;
    }
    char* slot = ring + (i % STAGES) * SM::SLOT;
    if (lane == 0) {
      *reinterpret_cast<const int32_t**>(slot) = queue.cur;
      *reinterpret_cast<uint32_t*>(slot + 8) = queue.cur_counts;
    }
    const char* blk = reinterpret_cast<const char*>(queue.cur);
    if (j == 0 && lane < D / 16) cp_async16(slot + SM::PERM + 16 * lane, blk + 16 * lane);
    const char* vsrc = vrow + size_t((k0 + n * WARPS) * BP + j) * PV::BYTES;
#pragma unroll
    for (int c = lane; c < PV::BYTES / 16; c += 32) cp_async16(slot + SM::VAL + 16 * c, vsrc + 16 * c);
    if (fetch_bytes <= SM::KEY_CAP) {
      const char* ksrc = blk + header_words<D>() * 4 + size_t(j) * fetch_bytes;
      for (int c = lane; c < fetch_bytes / 16; c += 32) cp_async16(slot + SM::KEY + 16 * c, ksrc + 16 * c);
    }
  };
#pragma unroll
  for (int i = 0; i < STAGES - 1; ++i) {
    if (i < pages) fetch(i);
    cp_async_commit();
  }
  uint32_t counts = 0;
  int kst[TIERS];  // each tier's first k-step in qf
  for (int i = 0; i < pages; ++i) {
    cp_async_wait<STAGES - 2>();
    __syncwarp();  // the slot's bytes and meta are every lane's; the slot fetched next is read
    if (i + STAGES - 1 < pages) fetch(i + STAGES - 1);
    cp_async_commit();
    const char* slot = ring + (i % STAGES) * SM::SLOT;
    const int j = i % BP;
    if (j == 0) {  // a new block: its tiers, and the query's columns in each tier's order as B fragments
      counts = *reinterpret_cast<const uint32_t*>(slot + 8);
      const Tiers tr(counts);
      const uint8_t* perm = reinterpret_cast<const uint8_t*>(slot + SM::PERM);
      int at = 0;
#pragma unroll
      for (int tier = 0; tier < TIERS; ++tier) {
        kst[tier] = at;
#pragma unroll
        for (int kk = 0; kk < KK; ++kk) {
          if (kk * 16 >= tr.c[tier]) break;
#pragma unroll
          for (int x = 0; x < 2; ++x) {  // slots start + 16 kk + 2t + {0, 1} (+ 8)
            const int s0 = tr.start[tier] + 16 * kk + 2 * t + 8 * x;
            float v[2];
#pragma unroll
            for (int e = 0; e < 2; ++e)
              v[e] = g < p.gqa && s0 + e < tr.start[tier] + tr.n[tier] ? Num<T>::to_f(q[perm[s0 + e]]) : 0.f;
            qf[((at + kk) * 32 + lane) * 2 + x] = Num<T>::pack2(v[0], v[1]);
          }
        }
        at += tr.c[tier] / 16;
      }
      __syncwarp();
    }
    const Tiers tr(counts);
    const char* pg = tr.page_bytes <= SM::KEY_CAP
                         ? slot + SM::KEY
                         : reinterpret_cast<const char*>(*reinterpret_cast<const int32_t* const*>(slot) +
                                                         header_words<D>()) + size_t(j) * tr.page_bytes;
    float s[2][4] = {}, s2[2][4] = {}, bias[2][4] = {};
    {  // full precision: the raw values are the A fragments
      const uint32_t* kc = reinterpret_cast<const uint32_t*>(pg + tr.code[0]);
      const int nk = tr.c[0] / 16, w = tr.words[0];
#pragma unroll
      for (int kk = 0; kk < KK; ++kk) {
        if (kk >= nk) break;
        const uint2 qq = *reinterpret_cast<const uint2*>(qf + ((kst[0] + kk) * 32 + lane) * 2);
#pragma unroll
        for (int m = 0; m < 2; ++m) {
          const uint4 a4 = *reinterpret_cast<const uint4*>(kc + (m * 32 + lane) * w + kk * 4);
          const uint32_t a[4] = {a4.x, a4.y, a4.z, a4.w};
          mma16816(kk & 1 ? s2[m] : s[m], a, qq.x, qq.y, BF16);
        }
      }
    }
    tier_scores<T, 4, KK>(pg, tr, 1, qf + kst[1] * 32 * 2, lane, g, t, s, s2, bias);
    tier_scores<T, 2, KK>(pg, tr, 2, qf + kst[2] * 32 * 2, lane, g, t, s, s2, bias);
    {
      // bias of lane (0, t): heads 2t, 2t + 1 of the zero rows; every token of the page adds it.
      const float b0 = __shfl_sync(0xffffffffu, bias[0][0] + bias[1][0], t);
      const float b1 = __shfl_sync(0xffffffffu, bias[0][1] + bias[1][1], t);
#pragma unroll
      for (int m = 0; m < 2; ++m) {
        s[m][0] += s2[m][0] + b0; s[m][1] += s2[m][1] + b1; s[m][2] += s2[m][2] + b0; s[m][3] += s2[m][3] + b1;
      }
    }
    acc.template page<PV>(s, slot + SM::VAL, p.scale_log2, lane, g, t);
  }
  cp_async_wait<0>();
  acc.template write<WARPS>(p, b, h, split, smem, warp, g, t, false);
}

}  // namespace fpd

// The gconv kernel (see gconv_cpu.cpp), written once for any SIMD width.
//
// Not a normal header: a kernel file includes it after defining
//   MANIDP_GCONV_TARGET  the function attribute of its instruction set (target("...")), and
//   struct Isa           vector type V, lane-mask type M, lanes kW, register block kMR x kNV,
//                        and the handful of vector operations used below.
// Everything here has internal linkage, so the AVX-512 and the AVX2 instantiations of these
// functions never meet at link time; only the functions marked MANIDP_GCONV_TARGET use the
// instruction set, so nothing shared with the rest of the library is compiled for it.
// The kernel file then defines its entry point by calling run_gconv(args).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "manidp_cpu.h"

namespace manidp {
namespace detail {
namespace {

using V = Isa::V;
using M = Isa::M;
constexpr int kW = Isa::kW;    // floats per vector
constexpr int kMR = Isa::kMR;  // output rows per register block
constexpr int kNV = Isa::kNV;  // vectors per pixel tile
constexpr int64_t kTile = static_cast<int64_t>(kW) * kNV;

// Lane bits of the vectors of one tile [q0, q0 + kTile): real pixels, and the lanes where the
// kx = 0 / kx = 2 taps read inside the image.  Plain bits, turned into Isa masks inside the
// kernel, so that this bookkeeping compiles for any CPU.
struct TileMap {
  int nv = 0;
  uint32_t valid[kNV] = {};
  uint32_t left[kNV] = {};
  uint32_t right[kNV] = {};
};

// Bits l0, l0 + step, l0 + 2 step, ... below kW.
uint32_t every_step(int64_t l0, int64_t step) {
  uint32_t bits = 0;
  for (int64_t l = l0; l < kW; l += step) bits |= 1u << l;
  return bits;
}

TileMap tile_map(const GConvArgs& a, int64_t q0, int64_t qend) {
  const int64_t wo = a.geom.wo;
  constexpr uint32_t all = (1u << kW) - 1u;
  TileMap t;
  t.nv = static_cast<int>(std::min<int64_t>(kNV, (qend - q0 + kW - 1) / kW));
  int64_t ox = q0 % wo;  // column of the vector's first lane; one division per tile
  for (int v = 0; v < t.nv; ++v) {
    const int64_t n = std::min<int64_t>(kW, qend - q0 - kW * v);
    t.valid[v] = n == kW ? all : (1u << n) - 1u;
    t.left[v] = all & ~every_step(ox == 0 ? 0 : wo - ox, wo);           // lanes in column 0
    t.right[v] = a.geom.stride != 1 ? all : all & ~every_step(wo - 1 - ox, wo);  // in column wo - 1
    ox = wo >= kW ? (ox + kW >= wo ? ox + kW - wo : ox + kW) : (ox + kW) % wo;
  }
  return t;
}

// A register block in inline assembly (gconv_avx512_asm.inc, for the AVX-512 kernel): the
// arguments of its loop over input channels.  It writes the MR x NV accumulators, row-major, to
// `acc` (64-byte aligned): the sums, starting from zero.
struct AsmBlockArgs {
  const float* in;           // the tile's first pixel in the first input channel's plane
  int64_t nch;               // input channels
  int64_t cstride_bytes;     // from one channel's plane to the next
  const int32_t* cols;       // each input channel's column in the weight rows, or null: j
  const int64_t* toff_bytes; // the 9 taps' offsets
  const uint16_t* masks;     // lane masks: left edge of vectors 0..3, then right edge of 0..3
  float* acc;
  const float* w[kMR];       // the block's weight rows
};
template <int MR, int NV>
struct AsmBlock {
  static constexpr bool kHas = false;
  static void run(const AsmBlockArgs&) {}
};

// MANIDP_GCONV_ASM=0 turns the assembly blocks off (for A/B timing and tests of both paths).
bool asm_blocks_enabled() {
  static const bool enabled = [] {
    const char* env = std::getenv("MANIDP_GCONV_ASM");
    return !(env && env[0] == '0' && env[1] == '\0');
  }();
  return enabled;
}

template <int MR, int NV>
MANIDP_GCONV_TARGET inline void micro_asm(const GConvArgs& a, const float* const* wrow, int64_t q0, const TileMap& tm,
                                          V (&acc)[kMR][kNV]) {
  alignas(64) float out[MR * NV * kW];
  uint16_t masks[8] = {};
  for (int v = 0; v < NV; ++v) {
    masks[v] = static_cast<uint16_t>(tm.left[v]);
    masks[4 + v] = static_cast<uint16_t>(tm.right[v]);
  }
  int64_t toff[9];
  for (int t = 0; t < 9; ++t) toff[t] = a.geom.toff[t] * static_cast<int64_t>(sizeof(float));
  AsmBlockArgs p{a.in + q0, a.nch, a.geom.cstride * static_cast<int64_t>(sizeof(float)), a.cols, toff, masks, out, {}};
  for (int r = 0; r < MR; ++r) p.w[r] = wrow[r];
  AsmBlock<MR, NV>::run(p);
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = Isa::load(out + (r * NV + v) * kW);
}

// acc[r][v] = sum over input channels and taps of w[r][col(j) * TAPS + t] * B(j, t, q0 + kW v),
// acc zero on entry.
// TAPS 9: the 3x3 conv; TAPS 1: only the centre tap, a 1x1 conv with the same stride.
template <int MR, int NV, int TAPS>
MANIDP_GCONV_TARGET inline void micro(const GConvArgs& a, const float* const* wrow, int64_t q0, const TileMap& tm,
                                      V (&acc)[kMR][kNV]) {
  if constexpr (TAPS == 9 && AsmBlock<MR, NV>::kHas) {
    if (asm_blocks_enabled()) return micro_asm<MR, NV>(a, wrow, q0, tm, acc);
  }
  const int64_t* toff = a.geom.toff;
  const float* bj = a.in + q0;
  M ml[NV], mr[NV];
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) {
    ml[v] = Isa::mask(tm.left[v]);
    mr[v] = Isa::mask(tm.right[v]);
  }
  for (int64_t j = 0; j < a.nch; ++j, bj += a.geom.cstride) {
    const int64_t off = (a.cols ? static_cast<int64_t>(a.cols[j]) : j) * TAPS;
    const float* wp[MR];
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) wp[r] = wrow[r] + off;
    if constexpr (TAPS == 1) {
      const float* b = bj + toff[4];
      V bv[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) bv[v] = Isa::loadu(b + kW * v);
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        const V wv = Isa::set1(wp[r][0]);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[r][v] = Isa::fmadd(wv, bv[v], acc[r][v]);
      }
      continue;
    }
#pragma GCC unroll 1
    for (int ky = 0; ky < 3; ++ky) {
#pragma GCC unroll 3
      for (int kx = 0; kx < 3; ++kx) {
        const int t = ky * 3 + kx;
        const float* b = bj + toff[t];
        V bv[NV];
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v)
          bv[v] = kx == 1 ? Isa::loadu(b + kW * v) : Isa::maskz_loadu(kx == 0 ? ml[v] : mr[v], b + kW * v);
#pragma GCC unroll 8
        for (int r = 0; r < MR; ++r) {
          const V wv = Isa::set1(wp[r][t]);
#pragma GCC unroll 4
          for (int v = 0; v < NV; ++v) acc[r][v] = Isa::fmadd(wv, bv[v], acc[r][v]);
        }
      }
    }
  }
}

// One register block: rows [m0, m0 + MR) x tile q0, all input channels, fused epilogue.
template <int MR, int NV, int TAPS>
MANIDP_GCONV_TARGET void block(const GConvArgs& a, int64_t m0, int64_t q0, const TileMap& tm, float* pooled) {
  V acc[kMR][kNV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = Isa::zero();
  const float* wrow[MR];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) wrow[r] = a.weight + static_cast<int64_t>(a.rows[m0 + r]) * a.ldw;
  micro<MR, NV, TAPS>(a, wrow, q0, tm, acc);

  const V zero = Isa::zero();
  M valid[NV];
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) valid[v] = Isa::mask(tm.valid[v]);
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    const int64_t m = m0 + r;
    const int64_t chan = (a.out_chans ? static_cast<int64_t>(a.out_chans[m]) : m) * a.out_chan_stride;
    const V bias = Isa::set1(a.bias[m]);
    const V scale = Isa::set1(a.scale ? a.scale[m] : 1.f);
    V psum = zero;
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      V y = Isa::mul(scale, Isa::add(acc[r][v], bias));
      float* dst = a.out + chan + a.out_offset + q0 + kW * v;
      if (a.residual) y = Isa::add(y, Isa::maskz_loadu(valid[v], a.residual + (dst - a.out)));
      if (a.relu) y = Isa::max(zero, y);  // operand order: a NaN y passes through, as torch.relu
      Isa::mask_storeu(dst, valid[v], y);
      if (pooled) psum = Isa::add(psum, Isa::maskz_mov(valid[v], y));
    }
    if (pooled) pooled[m] += Isa::reduce_add(psum);
  }
}

// Register block of the tile's nv (1..NV) vectors.
template <int MR, int TAPS, int NV = kNV>
void block_nv(const GConvArgs& a, int64_t m0, int64_t q0, const TileMap& tm, float* pooled) {
  if constexpr (NV > 1) {
    if (tm.nv < NV) return block_nv<MR, TAPS, NV - 1>(a, m0, q0, tm, pooled);
  }
  block<MR, NV, TAPS>(a, m0, q0, tm, pooled);
}

// Register block of mr (1..kMR) rows.
template <int MR = kMR>
void block_any(const GConvArgs& a, int64_t m0, int mr, int64_t q0, const TileMap& tm, float* pooled) {
  if constexpr (MR > 1) {
    if (mr < MR) return block_any<MR - 1>(a, m0, mr, q0, tm, pooled);
  }
  if (a.taps == 1)
    block_nv<MR, 1>(a, m0, q0, tm, pooled);
  else
    block_nv<MR, 9>(a, m0, q0, tm, pooled);
}

constexpr int kTailPixels = 4;  // at most this many pixels past the register-block tiles (split_of)

// Dot products of one weight row `w` (k floats) with NP patches `col` (NP x k floats) into
// `sums`.  Each pixel's sum is split over U accumulator chains: with one or two pixels a single
// chain per pixel would wait on the FMA latency at every step (a 7x7 map's one tail pixel).
template <int NP>
MANIDP_GCONV_TARGET void tail_dot(const float* w, const float* col, int64_t k, float* sums) {
  constexpr int U = NP <= 2 ? 4 : 2;
  V acc[NP][U];
#pragma GCC unroll 4
  for (int p = 0; p < NP; ++p)
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u) acc[p][u] = Isa::zero();
  int64_t i = 0;
  for (; i + U * kW <= k; i += U * kW) {
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u) {
      const V wv = Isa::loadu(w + i + u * kW);
#pragma GCC unroll 4
      for (int p = 0; p < NP; ++p) acc[p][u] = Isa::fmadd(wv, Isa::loadu(col + p * k + i + u * kW), acc[p][u]);
    }
  }
  for (; i + kW <= k; i += kW) {
    const V wv = Isa::loadu(w + i);
#pragma GCC unroll 4
    for (int p = 0; p < NP; ++p) acc[p][0] = Isa::fmadd(wv, Isa::loadu(col + p * k + i), acc[p][0]);
  }
  if (i < k) {
    const M rest = Isa::mask((1u << (k - i)) - 1u);
    const V wv = Isa::maskz_loadu(rest, w + i);
#pragma GCC unroll 4
    for (int p = 0; p < NP; ++p) acc[p][0] = Isa::fmadd(wv, Isa::maskz_loadu(rest, col + p * k + i), acc[p][0]);
  }
#pragma GCC unroll 4
  for (int p = 0; p < NP; ++p) {
#pragma GCC unroll 4
    for (int u = 1; u < U; ++u) acc[p][0] = Isa::add(acc[p][0], acc[p][u]);
    sums[p] = Isa::reduce_add(acc[p][0]);
  }
}

// The few pixels [q0, qend) of a map just past a multiple of 16 (7 x 7 = 3 * 16 + 1), computed
// as dot products along K: in the register blocks they would fill a vector of mostly idle lanes
// that costs as much as a whole vector, here they cost 1/kW of one.  Their input patches are
// gathered once per conv part; each row's dot products run right after the register block that
// computed the row's other pixels, while its weights are still in cache (late layers read each
// weight from memory once per conv: a separate pass over the rows would read them twice).
//
// Each patch runs along the weight row so that every load is a whole vector and each weight
// vector serves all np pixels.  conv2 reads only its active columns cols[j] of a row.  Where
// they are at least half the row, the patches span the whole row (k = ldw), zero in the
// inactive channels' places, and the dot products read each row in place: copying a row's
// active columns together, K copies of 9 floats, cost more than the zero products this adds.
// With fewer active columns each row's are copied together into `wbuf` (k = K x taps).
struct TailPixels {
  int64_t q0 = 0;
  int np = 0;                    // 1..kTailPixels
  int64_t k = 0;                 // floats per patch
  bool whole_rows = false;       // patches along the whole weight row (cols given, k = ldw)
  std::vector<float> col, wbuf;  // the pixels' patches (np x k); one row's gathered weights
};

void gather_tail(const GConvArgs& a, int64_t q0, int64_t qend, TailPixels& tp) {
  const PlaneGeometry& g = a.geom;
  tp.q0 = q0;
  tp.np = static_cast<int>(qend - q0);
  tp.whole_rows = a.cols && 2 * a.nch * a.taps >= a.ldw;
  tp.k = tp.whole_rows ? a.ldw : a.nch * a.taps;
  tp.col.assign(tp.np * tp.k, 0.f);
  tp.wbuf.resize(a.cols && !tp.whole_rows ? tp.k : 0);
  for (int p = 0; p < tp.np; ++p) {
    const int64_t q = q0 + p, ox = q % g.wo;
    float* patch = tp.col.data() + p * tp.k;
    for (int i = 0; i < a.taps; ++i) {
      const int t = a.taps == 1 ? 4 : i, kx = t % 3;
      const bool pad = (kx == 0 && ox == 0) || (kx == 2 && g.stride == 1 && ox == g.wo - 1);
      if (pad) continue;  // zero: the tap reads the padding
      for (int64_t j = 0; j < a.nch; ++j) {
        const int64_t c = tp.whole_rows ? a.cols[j] : j;  // active lists hold each channel once
        patch[c * a.taps + i] = a.in[j * g.cstride + g.toff[t] + q];
      }
    }
  }
}

// Pixels [tp.q0, tp.q0 + tp.np) of output row m, as dot products of the row's weights with the
// patches, then the epilogue.
MANIDP_GCONV_TARGET void tail_row(const GConvArgs& a, int64_t m, TailPixels& tp, float* pooled) {
  const float* w = a.weight + static_cast<int64_t>(a.rows[m]) * a.ldw;
  if (a.cols && !tp.whole_rows) {  // fixed-size copies, which the compiler inlines: a library call per 9 floats costs more
    for (int64_t j = 0; j < a.nch; ++j) {
      const float* src = w + static_cast<int64_t>(a.cols[j]) * a.taps;
      if (a.taps == 9)
        std::memcpy(tp.wbuf.data() + j * 9, src, 9 * sizeof(float));
      else
        std::copy_n(src, a.taps, tp.wbuf.data() + j * a.taps);
    }
    w = tp.wbuf.data();
  }
  const float* col = tp.col.data();
  float sums[kTailPixels];
  switch (tp.np) {
    case 1: tail_dot<1>(w, col, tp.k, sums); break;
    case 2: tail_dot<2>(w, col, tp.k, sums); break;
    case 3: tail_dot<3>(w, col, tp.k, sums); break;
    default: tail_dot<4>(w, col, tp.k, sums); break;
  }
  const int64_t chan = (a.out_chans ? static_cast<int64_t>(a.out_chans[m]) : m) * a.out_chan_stride;
  for (int p = 0; p < tp.np; ++p) {
    float y = (a.scale ? a.scale[m] : 1.f) * (sums[p] + a.bias[m]);
    float* dst = a.out + chan + a.out_offset + tp.q0 + p;
    if (a.residual) y += a.residual[dst - a.out];
    if (a.relu) y = y < 0.f ? 0.f : y;  // NaN passes through, as torch.relu
    *dst = y;
    if (pooled) pooled[m] += y;
  }
}

void tail_rows(const GConvArgs& a, TailPixels& tp, int64_t m0, int64_t m1, float* pooled) {
  for (int64_t m = m0; m < m1; ++m) tail_row(a, m, tp, pooled);
}

// Rows [r0, r1) of the tile at q0 in register blocks of at most kMR rows, as equal as possible
// (32 rows: 6 6 5 5 5 5, not 6 6 6 6 6 2: no block is left with a few rows that still pay the
// whole tile's loads).  `tail`, when not null, holds the map's tail pixels, computed for each
// block's rows after it.
void run_rows(const GConvArgs& a, int64_t q0, const TileMap& tm, int64_t r0, int64_t r1, TailPixels* tail,
              float* pooled) {
  const int64_t len = r1 - r0, nb = (len + kMR - 1) / kMR;
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t m0 = r0 + len * b / nb, m1 = r0 + len * (b + 1) / nb;
    block_any(a, m0, static_cast<int>(m1 - m0), q0, tm, pooled);
    if (tail) tail_rows(a, *tail, m0, m1, pooled);
  }
}

// Units [u0, u1) of the (tile, row) grid over the pixels below qend, tile-major (unit u is row
// u % m of tile u / m): consecutive units share a tile, whose input stays in L1/L2 while the
// row blocks sweep it.  The rows of the last tile also get the tail pixels (if `tail`), so every
// row's tail is computed once, by whoever computes that row of the last tile.  Pooled sums (if
// any) go to one slot per unit, pooled[tile * m + row], which this sets: each unit is computed
// by exactly one caller, so the slots need no zeroing beforehand, and their sum over tiles in
// tile order does not depend on how the units were shared out.
void run_units(const GConvArgs& a, int64_t qend, int64_t u0, int64_t u1, TailPixels* tail, float* pooled) {
  const int64_t last_tile = (qend - 1) / kTile;
  for (int64_t u = u0; u < u1;) {
    const int64_t tile = u / a.m, r0 = u % a.m, r1 = std::min<int64_t>(a.m, r0 + (u1 - u));
    float* slots = pooled ? pooled + tile * a.m : nullptr;
    if (slots) std::fill(slots + r0, slots + r1, 0.f);
    run_rows(a, tile * kTile, tile_map(a, tile * kTile, qend), r0, r1, tile == last_tile ? tail : nullptr, slots);
    u += r1 - r0;
  }
}

// How a conv's pixels split: register-block tiles below qmain, dot-product tail pixels above.
struct Split {
  int64_t qend, qmain, units;  // units: tiles x rows
};

Split split_of(const GConvArgs& a) {
  Split s;
  s.qend = a.geom.ho * a.geom.wo;
  // 1 to kTailPixels pixels past a multiple of 16 are tail pixels (7x7: 49 = 48 + 1, 14x14: 196 = 192 + 4).
  const int64_t rest = s.qend % 16;
  s.qmain = (s.qend > 16 && rest <= kTailPixels) ? s.qend - rest : s.qend;
  s.units = (s.qmain + kTile - 1) / kTile * a.m;
  return s;
}

int64_t run_gconv_tiles(const GConvArgs& a) { return a.m > 0 ? split_of(a).units / a.m : 0; }

// The first unit of part `part` of `nparts`, so that the parts cost the same, not only hold the
// same number of units: a row of the last tile costs its vectors (28x28: 784 = 12 x 64 + 16, one
// vector of four) plus its tail pixels, counted as a quarter vector each.  Within a tile the
// start is rounded to whole register blocks of rows.
int64_t part_start(const GConvArgs& a, const Split& s, int64_t part, int64_t nparts) {
  const int64_t tiles = s.units / a.m, full_units = (tiles - 1) * a.m;
  const int64_t last_vectors = (s.qmain - (tiles - 1) * kTile + kW - 1) / kW;
  const int64_t c_full = 4 * kNV, c_last = 4 * last_vectors + (s.qend - s.qmain);  // quarter vectors per unit
  const int64_t target = (full_units * c_full + a.m * c_last) * part / nparts;
  const int64_t u = target <= full_units * c_full ? target / c_full
                                                   : std::min(s.units, full_units + (target - full_units * c_full) / c_last);
  if (a.m <= kMR || part == nparts) return u;
  const int64_t row = u % a.m;
  return u - row + std::min<int64_t>(a.m, (row + kMR / 2) / kMR * kMR);
}

// Units [u0, u1) of the conv with the tail pixels of its rows of the last tile; `tail` holds
// the tail pixels' patches once gathered (one gather per caller and conv).
void run_share(const GConvArgs& a, const Split& s, int64_t u0, int64_t u1, TailPixels& tail, float* pooled) {
  const bool has_tail = s.qmain < s.qend && u1 > std::max(u0, s.units - a.m);  // it has rows of the last tile
  if (has_tail && tail.np == 0) gather_tail(a, s.qmain, s.qend, tail);
  run_units(a, s.qmain, u0, u1, has_tail ? &tail : nullptr, pooled);
}

// Chunks per thread of a team sharing a conv: 8 where every chunk still holds a register
// block's rows of some tiles, else 1.
int64_t chunks_per_rank(const Split& s, int64_t team) { return team > 1 && s.units >= 8 * team * kMR ? 8 : 1; }

// Takes a chunk of rank `owner`'s run [0, per) from its state: the owner from the front, another
// rank from the back.  The state packs how many each end has taken (low and high 32 bits).
// Returns the chunk's index in the run, or -1 when none is left.
int64_t take_chunk(std::atomic<int64_t>& state, int64_t per, bool front) {
  int64_t cur = state.load(std::memory_order_relaxed);
  for (;;) {
    const int64_t f = cur & 0xffffffff, b = cur >> 32;
    if (f + b >= per) return -1;
    const int64_t want = front ? cur + 1 : cur + (int64_t{1} << 32);
    if (state.compare_exchange_weak(cur, want, std::memory_order_relaxed)) return front ? f : per - 1 - b;
  }
}

// This thread's (rank `rank` of `team`) share of the conv run by the team, each of whose
// threads calls this with the same `states` (team counters, zero before the first call).  Each
// rank owns an equal-cost run of chunks and computes them front to back, so that a rank keeps
// the same part of every map, in its own cache, from conv to conv; a rank whose own chunks are
// done takes the other ranks' last chunks, so a rank that runs faster (the other vCPU busy, a
// neighbour on the host) does more instead of waiting at the next barrier.  Pooled sums go to
// pooled[tile * m + row] (run_units), run_gconv_tiles(a) x m floats.
void run_gconv_team(const GConvArgs& a, ChunkCounter* states, int64_t team, int64_t rank, float* pooled) {
  if (a.m <= 0) return;
  const Split s = split_of(a);
  const int64_t per = chunks_per_rank(s, team), chunks = per * team;
  TailPixels tail;
  for (int64_t i = 0; i < team; ++i) {
    const int64_t owner = (rank + i) % team;
    for (int64_t c; (c = take_chunk(states[owner].taken, per, i == 0)) >= 0;) {
      const int64_t chunk = owner * per + c;
      run_share(a, s, part_start(a, s, chunk, chunks), part_start(a, s, chunk + 1, chunks), tail, pooled);
    }
  }
}

// The whole conv, split across the intra-op threads, then the pooled means (summed over tiles
// in tile order).
void run_gconv(const GConvArgs& a) {
  if (a.m <= 0) return;
  const Split s = split_of(a);
  std::vector<float> slots(a.pooled ? s.units : 0);
  float* pooled = a.pooled ? slots.data() : nullptr;
  const int64_t nthreads = at::in_parallel_region() ? 1 : at::get_num_threads();
  if (nthreads == 1 || s.units <= kMR) {
    TailPixels tail;
    run_share(a, s, 0, s.units, tail, pooled);
  } else {
    at::parallel_for(0, nthreads, 1, [&](int64_t p0, int64_t p1) {
      TailPixels tail;
      for (int64_t p = p0; p < p1; ++p)
        run_share(a, s, part_start(a, s, p, nthreads), part_start(a, s, p + 1, nthreads), tail, pooled);
    });
  }
  if (a.pooled) {
    std::fill(a.pooled, a.pooled + a.m, 0.f);
    for (int64_t t = 0; t < s.units / a.m; ++t)
      for (int64_t m = 0; m < a.m; ++m) a.pooled[m] += slots[t * a.m + m];
    const float inv = 1.f / static_cast<float>(split_of(a).qend);
    for (int64_t m = 0; m < a.m; ++m) a.pooled[m] *= inv;
  }
}

}  // namespace
}  // namespace detail
}  // namespace manidp

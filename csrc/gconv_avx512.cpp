// gconv for CPUs with AVX-512F: a register block of 6 output rows x 64 pixels (24 of the 32
// zmm registers accumulate; lane masks live in k registers).  The 3x3 blocks of 3-6 rows x 48-64
// pixels run as inline assembly (gconv_avx512_asm.inc; docs/DESIGN.md 7.6).
#include <immintrin.h>

#include "manidp_cpu.h"

#if defined(__GNUC__) && defined(__x86_64__)
#define MANIDP_GCONV_TARGET __attribute__((target("avx512f,fma")))
// GCC 12's avx512fintrin.h trips these in _mm512_max_ps / _mm512_reduce_add_ps (its
// "undefined" source vectors); they are false positives.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace manidp {
namespace detail {
namespace {

struct Isa {
  using V = __m512;
  using M = __mmask16;
  static constexpr int kW = 16, kMR = 6, kNV = 4;
  MANIDP_GCONV_TARGET static inline M mask(uint32_t bits) { return static_cast<__mmask16>(bits); }
  MANIDP_GCONV_TARGET static inline V zero() { return _mm512_setzero_ps(); }
  MANIDP_GCONV_TARGET static inline V set1(float x) { return _mm512_set1_ps(x); }
  MANIDP_GCONV_TARGET static inline V loadu(const float* p) { return _mm512_loadu_ps(p); }
  MANIDP_GCONV_TARGET static inline V load(const float* p) { return _mm512_load_ps(p); }
  MANIDP_GCONV_TARGET static inline V maskz_loadu(M m, const float* p) { return _mm512_maskz_loadu_ps(m, p); }
  MANIDP_GCONV_TARGET static inline void mask_storeu(float* p, M m, V v) { _mm512_mask_storeu_ps(p, m, v); }
  MANIDP_GCONV_TARGET static inline V maskz_mov(M m, V v) { return _mm512_maskz_mov_ps(m, v); }
  MANIDP_GCONV_TARGET static inline V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  MANIDP_GCONV_TARGET static inline V add(V a, V b) { return _mm512_add_ps(a, b); }
  MANIDP_GCONV_TARGET static inline V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  MANIDP_GCONV_TARGET static inline V max(V a, V b) { return _mm512_max_ps(a, b); }
  MANIDP_GCONV_TARGET static inline float reduce_add(V v) { return _mm512_reduce_add_ps(v); }
};

}  // namespace
}  // namespace detail
}  // namespace manidp

#include "gconv_kernel.h"

namespace manidp {
namespace detail {
namespace {
#include "gconv_avx512_asm.inc"
}  // namespace
}  // namespace detail
}  // namespace manidp

namespace manidp {
namespace detail {
bool gconv_avx512_supported() { return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma"); }
void gconv_avx512(const GConvArgs& a) { run_gconv(a); }
void gconv_team_avx512(const GConvArgs& a, ChunkCounter* states, int64_t team, int64_t rank, float* pooled) {
  run_gconv_team(a, states, team, rank, pooled);
}
int64_t gconv_tiles_avx512(const GConvArgs& a) { return run_gconv_tiles(a); }
}  // namespace detail
}  // namespace manidp

#else  // not GCC on x86-64

namespace manidp {
namespace detail {
bool gconv_avx512_supported() { return false; }
void gconv_avx512(const GConvArgs&) { TORCH_CHECK(false, "manidp: gconv (AVX-512) is not built for this platform"); }
void gconv_team_avx512(const GConvArgs&, ChunkCounter*, int64_t, int64_t, float*) {
  TORCH_CHECK(false, "manidp: gconv (AVX-512) is not built for this platform");
}
int64_t gconv_tiles_avx512(const GConvArgs&) {
  TORCH_CHECK(false, "manidp: gconv (AVX-512) is not built for this platform");
}
}  // namespace detail
}  // namespace manidp

#endif

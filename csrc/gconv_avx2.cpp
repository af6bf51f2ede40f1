// gconv for CPUs with AVX2 and FMA but no AVX-512: a register block of 6 output rows x 16
// pixels (12 of the 16 ymm registers accumulate, 2 hold the input vectors, 1 the broadcast
// weight; lane masks are integer vectors for vmaskmov).
#include <immintrin.h>

#include "manidp_cpu.h"

#if defined(__GNUC__) && defined(__x86_64__)
#define MANIDP_GCONV_TARGET __attribute__((target("avx2,fma")))

namespace manidp {
namespace detail {
namespace {

struct Isa {
  using V = __m256;
  using M = __m256i;
  static constexpr int kW = 8, kMR = 6, kNV = 2;
  // Lane l is all ones where bit l is set.
  MANIDP_GCONV_TARGET static inline M mask(uint32_t bits) {
    const __m256i lane = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    return _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(static_cast<int>(bits)), lane), lane);
  }
  MANIDP_GCONV_TARGET static inline V zero() { return _mm256_setzero_ps(); }
  MANIDP_GCONV_TARGET static inline V set1(float x) { return _mm256_set1_ps(x); }
  MANIDP_GCONV_TARGET static inline V loadu(const float* p) { return _mm256_loadu_ps(p); }
  MANIDP_GCONV_TARGET static inline V load(const float* p) { return _mm256_load_ps(p); }
  // Masked-off lanes are not read (no fault past the end of a buffer) and come back as zero.
  MANIDP_GCONV_TARGET static inline V maskz_loadu(M m, const float* p) { return _mm256_maskload_ps(p, m); }
  MANIDP_GCONV_TARGET static inline void mask_storeu(float* p, M m, V v) { _mm256_maskstore_ps(p, m, v); }
  MANIDP_GCONV_TARGET static inline V maskz_mov(M m, V v) { return _mm256_and_ps(v, _mm256_castsi256_ps(m)); }
  MANIDP_GCONV_TARGET static inline V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  MANIDP_GCONV_TARGET static inline V add(V a, V b) { return _mm256_add_ps(a, b); }
  MANIDP_GCONV_TARGET static inline V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  MANIDP_GCONV_TARGET static inline V max(V a, V b) { return _mm256_max_ps(a, b); }
  MANIDP_GCONV_TARGET static inline float reduce_add(V v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
};

}  // namespace
}  // namespace detail
}  // namespace manidp

#include "gconv_kernel.h"

namespace manidp {
namespace detail {
bool gconv_avx2_supported() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }
void gconv_avx2(const GConvArgs& a) { run_gconv(a); }
void gconv_team_avx2(const GConvArgs& a, ChunkCounter* states, int64_t team, int64_t rank, float* pooled) {
  run_gconv_team(a, states, team, rank, pooled);
}
int64_t gconv_tiles_avx2(const GConvArgs& a) { return run_gconv_tiles(a); }
}  // namespace detail
}  // namespace manidp

#else  // not GCC on x86-64

namespace manidp {
namespace detail {
bool gconv_avx2_supported() { return false; }
void gconv_avx2(const GConvArgs&) { TORCH_CHECK(false, "manidp: gconv (AVX2) is not built for this platform"); }
void gconv_team_avx2(const GConvArgs&, ChunkCounter*, int64_t, int64_t, float*) {
  TORCH_CHECK(false, "manidp: gconv (AVX2) is not built for this platform");
}
int64_t gconv_tiles_avx2(const GConvArgs&) {
  TORCH_CHECK(false, "manidp: gconv (AVX2) is not built for this platform");
}
}  // namespace detail
}  // namespace manidp

#endif

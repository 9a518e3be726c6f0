// Stream compaction for the dynamic threshold's selection (csrc/ops/select_cpu.h): AVX-512's compress
// where the CPU has it (chosen at run time, as the noise loops are: simd_isa()), else a branch-free
// scalar loop. Both write the same values in the same order.
#include "ops/select_cpu.h"

#include "ops/ops.h"

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // as in noise_cpu.cpp: the headers' own
#include <immintrin.h>
#define PYDIFF_SELECT_X86 1
#endif

namespace pydiff {

int64_t compact_between_scalar(const float* v, int64_t n, float lo, float hi, float* dst) {
  int64_t k = 0;
  for (int64_t i = 0; i < n; ++i) {
    dst[k] = v[i];
    k += int64_t(v[i] > lo) & int64_t(!(v[i] >= hi));
  }
  return k;
}

#ifdef PYDIFF_SELECT_X86
#pragma GCC push_options
#pragma GCC target("avx512f")
namespace {
int64_t compact_between_avx512(const float* v, int64_t n, float lo, float hi, float* dst) {
  const __m512 vlo = _mm512_set1_ps(lo), vhi = _mm512_set1_ps(hi);
  int64_t k = 0, i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 x = _mm512_loadu_ps(v + i);
    // the register form of compress, then a plain store: the memory form is slow on some cores
    const __mmask16 m = _mm512_cmp_ps_mask(x, vlo, _CMP_GT_OQ) & ~_mm512_cmp_ps_mask(x, vhi, _CMP_GE_OQ);
    _mm512_storeu_ps(dst + k, _mm512_maskz_compress_ps(m, x));
    k += __builtin_popcount(unsigned(m));
  }
  return k + compact_between_scalar(v + i, n - i, lo, hi, dst + k);
}
}  // namespace
#pragma GCC pop_options
#endif

int64_t compact_between(const float* v, int64_t n, float lo, float hi, float* dst) {
#ifdef PYDIFF_SELECT_X86
  if (simd_isa() == kSimdAvx512) return compact_between_avx512(v, n, lo, hi, dst);
#endif
  return compact_between_scalar(v, n, lo, hi, dst);
}

}  // namespace pydiff

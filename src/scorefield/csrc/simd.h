// 8-lane float vectors (GCC/Clang vector extensions: AVX2 where the CPU has it, narrower SIMD elsewhere) and the
// clamped polynomial exp shared by the compiled patch-posterior kernels.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace sf_simd {

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

constexpr float kLogitFloor = -80.0f;  // same floor as kernels.LOGIT_FLOOR

inline v8f load8(const float* p) { v8f v; std::memcpy(&v, p, sizeof v); return v; }
inline void store8(float* p, v8f v) { std::memcpy(p, &v, sizeof v); }
inline v8f splat(float x) { return v8f{x, x, x, x, x, x, x, x}; }

inline float hsum(v8f v) {
  float s = 0.f;
  for (int i = 0; i < 8; ++i) s += v[i];
  return s;
}
inline float hmax(v8f v) {
  float s = v[0];
  for (int i = 1; i < 8; ++i) s = std::max(s, v[i]);
  return s;
}
inline int lane_bits(v8i mask) {  // bit t set when lane t of the comparison is true
#if defined(__AVX__)
  return _mm256_movemask_ps(reinterpret_cast<__m256>(mask));
#else
  int bits = 0;
  for (int i = 0; i < 8; ++i) bits |= (mask[i] ? 1 : 0) << i;
  return bits;
#endif
}
inline bool any_lane(v8i mask) { return lane_bits(mask) != 0; }

// exp for x ≤ 0 (clamped at kLogitFloor): 2^t with t = x·log2(e) split into n + f, |f| ≤ 1/2, 2^f by a
// degree-5 minimax polynomial (relative error 2.3e-7), 2^n added to the
// exponent bits: 12 vector operations (a Cephes-style degree-7 form takes 17); the weights are the hot loop
// of both kernels.
inline v8f exp8_fast(v8f x) {
  const v8f lo = splat(kLogitFloor);
  x = x < lo ? lo : x;
  const v8f magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to the nearest integer
  const v8f t = x * 1.44269504088896341f;
  const v8f fn = (t + magic) - magic;
  const v8f f = t - fn;
  v8f p = splat(1.327636418864131e-3f);
  p = p * f + 9.675540961325169e-3f;
  p = p * f + 5.550713464617729e-2f;
  p = p * f + 2.4022120237350464e-1f;
  p = p * f + 6.931469440460205e-1f;
  p = p * f + 1.0000001192092896f;
  v8i bits;
  std::memcpy(&bits, &p, sizeof bits);
  bits += __builtin_convertvector(fn, v8i) << 23;
  std::memcpy(&p, &bits, sizeof p);
  return p;
}

}  // namespace sf_simd

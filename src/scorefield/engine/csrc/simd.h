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

constexpr float kLog2e = 1.44269504088896341f;

// 2^t for t ≤ 0 (clamped at kLogitFloor·log2(e), i.e. e^kLogitFloor): t split into n + f, |f| ≤ 1/2, 2^f by a
// degree-5 minimax polynomial (relative error 2.3e-7), n read from the low bits of t + 1.5·2^23 (the addition
// that rounds t) and shifted into the exponent bits: 11 vector operations (a Cephes-style degree-7 exp takes
// 17); the weights are the hot loop of both kernels.
inline v8f exp2_8_fast(v8f t) {
  const v8f lo = splat(kLogitFloor * kLog2e);
#if defined(__AVX__)
  // = (t < lo ? lo : t), NaN kept, in one instruction (the compiler emits a compare and a blend for the select)
  t = reinterpret_cast<v8f>(_mm256_max_ps(reinterpret_cast<__m256>(lo), reinterpret_cast<__m256>(t)));
#else
  t = t < lo ? lo : t;
#endif
  const v8f magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to the nearest integer n, held in the low bits
  const v8f rounded = t + magic;
  const v8f f = t - (rounded - magic);
  v8f p = splat(1.327636418864131e-3f);
  p = p * f + 9.675540961325169e-3f;
  p = p * f + 5.550713464617729e-2f;
  p = p * f + 2.4022120237350464e-1f;
  p = p * f + 6.931469440460205e-1f;
  p = p * f + 1.0000001192092896f;
  v8i bits, n;
  std::memcpy(&bits, &p, sizeof bits);
  std::memcpy(&n, &rounded, sizeof n);
  bits += n << 23;  // the bits of rounded are 0x4B400000 + n: shifted by 23, only n's bits remain
  std::memcpy(&p, &bits, sizeof p);
  return p;
}

// e^x for x ≤ 0 (clamped at kLogitFloor).
inline v8f exp8_fast(v8f x) { return exp2_8_fast(x * kLog2e); }

}  // namespace sf_simd

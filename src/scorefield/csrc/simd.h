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

// exp on [floor, ~0]: Cody-Waite reduction x = n ln2 + r, degree-6 polynomial for e^r (Cephes expf,
// about 1 ulp), 2^n built in the exponent bits. Inputs are clamped at the floor, so no denormals.
inline v8f exp8(v8f x) {
  const v8f lo = splat(kLogitFloor);
  x = x < lo ? lo : x;
  const v8f magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to the nearest integer
  v8f fx = x * 1.44269504088896341f + magic;
  fx = fx - magic;
  v8f r = x - fx * 0.693359375f;
  r = r - fx * -2.12194440e-4f;
  v8f p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  v8f y = p * (r * r) + r + 1.0f;
  v8i n = __builtin_convertvector(fx, v8i);
  v8i bits = (n + 127) << 23;
  v8f two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return y * two_n;
}

}  // namespace sf_simd

// The streaming log-sum-exp state that the box-sum kernels (box_softmax.cpp, multisize_box.cpp) keep per query
// slot: inside a kernel, logits are in log2 units (ℓ·log2 e, so that a weight is 2^(ℓ₂ − m₂) with an exact
// subtraction near the max); the caller's state (m, l, acc) and threshold are in natural units.
#pragma once

#include <cmath>
#include <cstdint>

namespace sf_lse {

constexpr double kLog2eD = 1.4426950408889634;

// The first skip floor of a slot (log2 units) from the caller's state m0, l0: a key whose logit lies below it
// weighs less than e^−threshold of the mass known so far; −inf when the caller's state is empty.
inline float skip_floor(double m0, double l0, float threshold) {
  return l0 > 0.0 ? static_cast<float>((m0 + std::log(l0) - threshold) * kLog2eD) : -INFINITY;
}

// Merge one thread's state of n slots (max sm in log2 units, weight sum sl, weighted sums sacc [n, C], arg-max
// sbest) into the caller's (m, l, acc [n, C], best; natural units): rescale to the larger max and add. best and
// sbest may be null.
inline void merge_state(const float* sm, const double* sl, const double* sacc, const int64_t* sbest, int64_t n,
                        int64_t C, double* m, double* l, double* acc, int64_t* best) {
  for (int64_t q = 0; q < n; ++q) {
    if (!(sl[q] > 0.0)) continue;
    const double mt = sm[q] / kLog2eD;  // back to natural units
    if (mt > m[q]) {
      const double scale = std::exp(m[q] - mt);  // 0 when m is -inf
      l[q] *= scale;
      for (int64_t c = 0; c < C; ++c) acc[q * C + c] *= scale;
      m[q] = mt;
      if (best && sbest) best[q] = sbest[q];
    }
    const double w = std::exp(mt - m[q]);
    l[q] += w * sl[q];
    for (int64_t c = 0; c < C; ++c) acc[q * C + c] += w * sacc[q * C + c];
  }
}

}  // namespace sf_lse

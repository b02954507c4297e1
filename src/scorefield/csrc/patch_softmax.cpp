// Fused streaming softmax-weighted mean over a chunk of keys (the patch-posterior kernel).
//
// For query rows q_i, keys k_j, per-key bias b_j and values v_j (V <= 4 components) it folds
//     l_ij = scale * q_i.k_j + b_j
// into a running (max m_i, weight sum l_i, weighted sum acc_i) per row, exactly as
// scorefield.models.kernels.accumulate_reference does (Kamb & Ganguli, eq. 9-10 / 39-40: the Bayes weights
// of the ELS machine are a softmax over bank patches and the output is their weighted mean of centre pixels).
//
// What makes it fast: the score tile of a block of query rows x a block of keys stays in L2; the GEMM writes
// it once (BLAS sgemm for large D, a small register-blocked kernel for small D), then each row is read twice
// from L1 (max, then exp + sum + V weighted sums fused, with a polynomial exp that never takes a denormal
// path). Vectors of 8 keys whose logits all lie below the floor (weight < e^-80 relative to the running max)
// skip the exp. Row statistics are accumulated in double within one call. Plain C ABI for ctypes.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace {

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

typedef void (*sgemm_fn)(const char*, const char*, const int*, const int*, const int*, const float*,
                         const float*, const int*, const float*, const int*, const float*, float*, const int*);

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
inline bool any_lane(v8i mask) {
#if defined(__AVX__)
  return _mm256_movemask_ps(reinterpret_cast<__m256>(mask)) != 0;
#else
  for (int i = 0; i < 8; ++i) if (mask[i]) return true;
  return false;
#endif
}

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

// S[i, j] = alpha * sum_d q[i, d] * kT[d, j] for nq rows and nk keys (keys transposed: kT is [D, ldk]).
void direct_tile(const float* q, int64_t D, int64_t nq, const float* kT, int64_t ldk, int64_t nk, float alpha,
                 float* S, int64_t lds) {
  int64_t i = 0;
  for (; i + 4 <= nq; i += 4) {
    const float* q0 = q + i * D;
    int64_t j = 0;
    for (; j + 16 <= nk; j += 16) {  // 4 rows x 16 keys: 8 accumulators, 6 loads per 8 FMAs
      v8f a0 = splat(0.f), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
      for (int64_t d = 0; d < D; ++d) {
        v8f ka = load8(kT + d * ldk + j), kb = load8(kT + d * ldk + j + 8);
        float c0 = q0[d], c1 = q0[D + d], c2 = q0[2 * D + d], c3 = q0[3 * D + d];
        a0 += c0 * ka; b0 += c0 * kb;
        a1 += c1 * ka; b1 += c1 * kb;
        a2 += c2 * ka; b2 += c2 * kb;
        a3 += c3 * ka; b3 += c3 * kb;
      }
      store8(S + i * lds + j, a0 * alpha); store8(S + i * lds + j + 8, b0 * alpha);
      store8(S + (i + 1) * lds + j, a1 * alpha); store8(S + (i + 1) * lds + j + 8, b1 * alpha);
      store8(S + (i + 2) * lds + j, a2 * alpha); store8(S + (i + 2) * lds + j + 8, b2 * alpha);
      store8(S + (i + 3) * lds + j, a3 * alpha); store8(S + (i + 3) * lds + j + 8, b3 * alpha);
    }
    for (; j + 8 <= nk; j += 8) {
      v8f a0 = splat(0.f), a1 = a0, a2 = a0, a3 = a0;
      for (int64_t d = 0; d < D; ++d) {
        v8f kv = load8(kT + d * ldk + j);
        a0 += q0[d] * kv;
        a1 += q0[D + d] * kv;
        a2 += q0[2 * D + d] * kv;
        a3 += q0[3 * D + d] * kv;
      }
      store8(S + i * lds + j, a0 * alpha);
      store8(S + (i + 1) * lds + j, a1 * alpha);
      store8(S + (i + 2) * lds + j, a2 * alpha);
      store8(S + (i + 3) * lds + j, a3 * alpha);
    }
    for (; j < nk; ++j)
      for (int r = 0; r < 4; ++r) {
        float a = 0.f;
        for (int64_t d = 0; d < D; ++d) a += q0[r * D + d] * kT[d * ldk + j];
        S[(i + r) * lds + j] = a * alpha;
      }
  }
  for (; i < nq; ++i) {
    const float* qi = q + i * D;
    int64_t j = 0;
    for (; j + 8 <= nk; j += 8) {
      v8f a = splat(0.f);
      for (int64_t d = 0; d < D; ++d) a += qi[d] * load8(kT + d * ldk + j);
      store8(S + i * lds + j, a * alpha);
    }
    for (; j < nk; ++j) {
      float a = 0.f;
      for (int64_t d = 0; d < D; ++d) a += qi[d] * kT[d * ldk + j];
      S[i * lds + j] = a * alpha;
    }
  }
}

struct RowTopk {
  int64_t k;
  float* logit;    // [k], sorted descending
  int64_t* index;  // [k]
  void offer(float x, int64_t idx) {
    if (!(x > logit[k - 1])) return;
    int64_t p = k - 1;
    while (p > 0 && logit[p - 1] < x) {
      logit[p] = logit[p - 1];
      index[p] = index[p - 1];
      --p;
    }
    logit[p] = x;
    index[p] = idx;
  }
};

// Fold one row of scores (s + bias) into (m, l, acc). Returns nothing; m/l/acc are the row's running state.
template <int V>
void fold_row(const float* s, const float* bias, const float* valsT, int64_t ldv, int64_t nk, float& m,
              double& l, double* acc, RowTopk* topk, int64_t idx0) {
  // pass 1: the row max (and top-k candidates, rare after the first tiles)
  v8f vmax = splat(-INFINITY);
  int64_t j = 0;
  for (; j + 8 <= nk; j += 8) {
    v8f x = load8(s + j) + load8(bias + j);
    vmax = x > vmax ? x : vmax;
    if (topk) {
      v8i hit = x > splat(topk->logit[topk->k - 1]);
      if (any_lane(hit))
        for (int t = 0; t < 8; ++t) topk->offer(x[t], idx0 + j + t);
    }
  }
  float mx = hmax(vmax);
  for (; j < nk; ++j) {
    float x = s[j] + bias[j];
    mx = std::max(mx, x);
    if (topk) topk->offer(x, idx0 + j);
  }
  if (!(mx > m)) mx = m;  // keep the running max when the row brings nothing larger
  if (mx > m) {
    double r = std::exp(static_cast<double>(m) - static_cast<double>(mx));  // 0 for an empty state
    l *= r;
    for (int v = 0; v < V; ++v) acc[v] *= r;
    m = mx;
  }
  if (!std::isfinite(m)) return;
  // pass 2: weights, their sum and the V weighted sums in one sweep
  const v8f vm = splat(m), floor = splat(kLogitFloor);
  v8f sl = splat(0.f);
  v8f sa[V];
  for (int v = 0; v < V; ++v) sa[v] = splat(0.f);
  j = 0;
  for (; j + 8 <= nk; j += 8) {
    v8f x = load8(s + j) + load8(bias + j) - vm;
    if (!any_lane(x > floor)) continue;  // every weight below e^-80 of the max: negligible
    v8f w = exp8(x);
    sl += w;
    for (int v = 0; v < V; ++v) sa[v] += w * load8(valsT + v * ldv + j);
  }
  double tl = hsum(sl);
  double ta[V];
  for (int v = 0; v < V; ++v) ta[v] = hsum(sa[v]);
  for (; j < nk; ++j) {
    float x = std::max(s[j] + bias[j] - m, kLogitFloor);
    double w = std::exp(static_cast<double>(x));
    tl += w;
    for (int v = 0; v < V; ++v) ta[v] += w * valsT[v * ldv + j];
  }
  l += tl;
  for (int v = 0; v < V; ++v) acc[v] += ta[v];
}

struct Problem {
  int64_t G, Q, K, D, V;
  const float* q; int64_t q_gs;
  const float* keys; int64_t k_gs;    // [K, D] per group (BLAS path)
  const float* keysT; int64_t kT_gs;  // [D, K] per group (direct path)
  const float* bias; int64_t b_gs;
  const float* valsT; int64_t v_gs;   // [V, K] per group
  const float* scale; int64_t s_gs;
  float* m; float* l; float* acc;     // [G, Q], [G, Q], [G, Q, V]
  int64_t topk; float* tk_logit; int64_t* tk_index; int64_t key_offset;
  int64_t block_q, block_k;
  sgemm_fn sgemm;
};

template <int V>
void run_block(const Problem& p, int64_t g, int64_t q0, std::vector<float>& tile, std::vector<double>& stats) {
  const int64_t nq = std::min(p.block_q, p.Q - q0);
  const float alpha = p.scale[g * p.s_gs];
  const float* q = p.q + g * p.q_gs + q0 * p.D;
  float* m = p.m + g * p.Q + q0;
  double* l = stats.data();
  double* acc = stats.data() + nq;
  for (int64_t i = 0; i < nq; ++i) {
    l[i] = p.l[g * p.Q + q0 + i];
    for (int v = 0; v < V; ++v) acc[i * V + v] = p.acc[(g * p.Q + q0 + i) * V + v];
  }
  std::vector<RowTopk> tops;
  if (p.topk > 0)
    for (int64_t i = 0; i < nq; ++i)
      tops.push_back({p.topk, p.tk_logit + (g * p.Q + q0 + i) * p.topk, p.tk_index + (g * p.Q + q0 + i) * p.topk});
  for (int64_t k0 = 0; k0 < p.K; k0 += p.block_k) {
    const int64_t nk = std::min(p.block_k, p.K - k0);
    float* S = tile.data();
    const int64_t lds = p.block_k;
    if (p.sgemm) {
      // column-major view: S^T [nk, nq] = keys_tile [nk, D] * q^T [D, nq]
      const int m_ = static_cast<int>(nk), n_ = static_cast<int>(nq), k_ = static_cast<int>(p.D);
      const int lda = static_cast<int>(p.D), ldb = static_cast<int>(p.D), ldc = static_cast<int>(lds);
      const float beta = 0.f;
      p.sgemm("T", "N", &m_, &n_, &k_, &alpha, p.keys + g * p.k_gs + k0 * p.D, &lda, q, &ldb, &beta, S, &ldc);
    } else {
      direct_tile(q, p.D, nq, p.keysT + g * p.kT_gs + k0, p.K, nk, alpha, S, lds);
    }
    const float* bias = p.bias + g * p.b_gs + k0;
    const float* valsT = p.valsT + g * p.v_gs + k0;
    for (int64_t i = 0; i < nq; ++i)
      fold_row<V>(S + i * lds, bias, valsT, p.K, nk, m[i], l[i], acc + i * V,
                  p.topk > 0 ? &tops[i] : nullptr, p.key_offset + k0);
  }
  for (int64_t i = 0; i < nq; ++i) {
    p.l[g * p.Q + q0 + i] = static_cast<float>(l[i]);
    for (int v = 0; v < V; ++v) p.acc[(g * p.Q + q0 + i) * V + v] = static_cast<float>(acc[i * V + v]);
  }
}

template <int V>
void run_all(const Problem& p, int nthreads) {
  const int64_t nqb = (p.Q + p.block_q - 1) / p.block_q;
  const int64_t nblocks = p.G * nqb;
#pragma omp parallel num_threads(nthreads)
  {
    std::vector<float> tile(static_cast<size_t>(p.block_q * p.block_k));
    std::vector<double> stats(static_cast<size_t>(p.block_q * (V + 1)));
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < nblocks; ++b) run_block<V>(p, b / nqb, (b % nqb) * p.block_q, tile, stats);
  }
}

}  // namespace

extern "C" {

int sf_kernel_version() { return 1; }

// Returns 0 on success, 1 for an unsupported value dimension.
int sf_accumulate(int64_t G, int64_t Q, int64_t K, int64_t D, int64_t V,
                  const float* q, int64_t q_gs, const float* keys, int64_t k_gs, const float* keysT, int64_t kT_gs,
                  const float* bias, int64_t b_gs, const float* valsT, int64_t v_gs, const float* scale,
                  int64_t s_gs, float* m, float* l, float* acc, int64_t topk, float* tk_logit,
                  int64_t* tk_index, int64_t key_offset, int64_t block_q, int64_t block_k, int nthreads,
                  void* sgemm) {
  Problem p{G, Q, K, D, V, q, q_gs, keys, k_gs, keysT, kT_gs, bias, b_gs, valsT, v_gs, scale, s_gs,
            m, l, acc, topk, tk_logit, tk_index, key_offset, block_q, block_k, reinterpret_cast<sgemm_fn>(sgemm)};
  switch (V) {
    case 1: run_all<1>(p, nthreads); return 0;
    case 2: run_all<2>(p, nthreads); return 0;
    case 3: run_all<3>(p, nthreads); return 0;
    case 4: run_all<4>(p, nthreads); return 0;
    default: return 1;
  }
}

}  // extern "C"

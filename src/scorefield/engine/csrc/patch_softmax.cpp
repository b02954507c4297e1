// Fused streaming softmax-weighted mean over a chunk of keys (the patch-posterior kernel).
//
// For query rows q_i, keys k_j, per-key bias b_j and values v_j (V <= 4 components) it folds
//     l_ij = scale * q_i.k_j + b_j
// into a running (max m_i, weight sum l_i, weighted sum acc_i) per row, exactly as
// scorefield.engine.softmax.accumulate_reference does (Kamb & Ganguli, eq. 9-10 / 39-40: the Bayes weights
// of the ELS machine are a softmax over bank patches and the output is their weighted mean of centre pixels).
//
// What makes it fast: the score tile of a block of query rows x a block of keys stays in L2. For large D BLAS
// sgemm writes it, then each row is read twice (max, then exp + sum + V weighted sums fused, with a
// polynomial exp that never takes a denormal path). For D <= 64 a register-blocked kernel over keys packed in
// panels of 16 writes the logits with the bias added and the row max taken as they leave the registers, so
// each row is read once (exp + sums, with the top-k search folded into the same sweep when the row can
// change the top-k). Vectors of 8 keys whose logits all lie below the floor (weight < e^-80 relative to the
// running max) skip the exp. Row statistics are accumulated in double within one call. Plain C ABI for
// ctypes.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif
#include "simd.h"

namespace {

using namespace sf_simd;

typedef void (*sgemm_fn)(const char*, const char*, const int*, const int*, const int*, const float*,
                         const float*, const int*, const float*, const int*, const float*, float*, const int*);

// Direct path (small D). Keys come packed in panels of 16: panel b holds keys 16b..16b+15 as [D, 16] (the
// last panel zero-padded), so the 16 keys of one d are two adjacent 8-wide vectors and a panel is one
// contiguous stream. Logits l = alpha * q.k + bias of R query rows x 16 keys accumulate in registers and are
// stored to the score tile with the bias already added while each row's running max is updated: the tile is
// then read only once.
constexpr int64_t kPanel = 16;

template <int R>
inline void logit_block(const float* q, int64_t D, const float* panel, float alpha, const float* bias,
                        float* S, int64_t lds, v8f* rmax) {
  v8f a[R][2];
  for (int r = 0; r < R; ++r) a[r][0] = a[r][1] = splat(0.f);
  for (int64_t d = 0; d < D; ++d) {
    const v8f k0 = load8(panel + d * kPanel), k1 = load8(panel + d * kPanel + 8);
    for (int r = 0; r < R; ++r) {
      const float c = q[r * D + d];
      a[r][0] += c * k0;
      a[r][1] += c * k1;
    }
  }
  for (int v = 0; v < 2; ++v) {
    const v8f b = load8(bias + 8 * v);
    for (int r = 0; r < R; ++r) {
      const v8f x = a[r][v] * alpha + b;
      store8(S + r * lds + 8 * v, x);
      rmax[r] = x > rmax[r] ? x : rmax[r];
    }
  }
}

// R rows x nk keys of biased logits into S (rows of lds >= nk rounded up to 16), each row's max into row_max.
template <int R>
void logit_rows(const float* q, int64_t D, const float* panels, int64_t nk, float alpha, const float* bias,
                float* S, int64_t lds, float* row_max) {
  v8f rmax[R];
  for (int r = 0; r < R; ++r) rmax[r] = splat(-INFINITY);
  int64_t j = 0;
  for (; j + kPanel <= nk; j += kPanel)
    logit_block<R>(q, D, panels + j * D, alpha, bias + j, S + j, lds, rmax);
  if (j < nk) {  // the padded last panel: its missing keys get bias -inf, so they never raise the max
    float padded[kPanel];
    for (int64_t t = 0; t < kPanel; ++t) padded[t] = j + t < nk ? bias[j + t] : -INFINITY;
    logit_block<R>(q, D, panels + j * D, alpha, padded, S + j, lds, rmax);
  }
  for (int r = 0; r < R; ++r) row_max[r] = hmax(rmax[r]);
}

// S[i, j] = alpha * q_i.k_j + bias_j for nq rows and nk keys, row_max[i] = max_j S[i, j].
void direct_tile(const float* q, int64_t D, int64_t nq, const float* panels, int64_t nk, float alpha,
                 const float* bias, float* S, int64_t lds, float* row_max) {
  constexpr int kRows = 6;  // 6 rows x 16 keys: 12 accumulators, 8 loads per 12 FMAs (FMA-bound)
  int64_t i = 0;
  for (; i + kRows <= nq; i += kRows)
    logit_rows<kRows>(q + i * D, D, panels, nk, alpha, bias, S + i * lds, lds, row_max + i);
  const float* qi = q + i * D;
  float* Si = S + i * lds;
  switch (nq - i) {
    case 5: logit_rows<5>(qi, D, panels, nk, alpha, bias, Si, lds, row_max + i); break;
    case 4: logit_rows<4>(qi, D, panels, nk, alpha, bias, Si, lds, row_max + i); break;
    case 3: logit_rows<3>(qi, D, panels, nk, alpha, bias, Si, lds, row_max + i); break;
    case 2: logit_rows<2>(qi, D, panels, nk, alpha, bias, Si, lds, row_max + i); break;
    case 1: logit_rows<1>(qi, D, panels, nk, alpha, bias, Si, lds, row_max + i); break;
    default: break;
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
  // Offer 8 consecutive keys, in key order. thr is the caller's splat of the k-th largest logit, refreshed
  // here after an insertion: only lanes above it can enter, and offer() re-checks each one exactly.
  void offer8(v8f x, int64_t idx0, v8f& thr) {
    int bits = lane_bits(x > thr);
    if (!bits) return;
    float xs[8];
    store8(xs, x);
    for (; bits; bits &= bits - 1) {
      const int t = __builtin_ctz(static_cast<unsigned>(bits));
      offer(xs[t], idx0 + t);
    }
    thr = splat(logit[k - 1]);
  }
};

// Pass 2 of a row: rescale the running state to the new max mx, then weights exp(x - m), their sum and the V
// weighted sums in one sweep, where x = s (+ bias when kBias); with kTopk the same sweep offers x to the
// row's top-k (before the floor test: a key far below the max still enters a top-k that is not yet full).
template <int V, bool kBias, bool kTopk = false>
void fold_weights(const float* s, const float* bias, const float* valsT, int64_t ldv, int64_t nk, float mx,
                  float& m, double& l, double* acc, RowTopk* topk = nullptr, int64_t idx0 = 0) {
  if (!(mx > m)) mx = m;  // keep the running max when the row brings nothing larger
  if (mx > m) {
    double r = std::exp(static_cast<double>(m) - static_cast<double>(mx));  // 0 for an empty state
    l *= r;
    for (int v = 0; v < V; ++v) acc[v] *= r;
    m = mx;
  }
  if (!std::isfinite(m)) {
    if constexpr (kTopk)
      for (int64_t j = 0; j < nk; ++j) topk->offer(s[j], idx0 + j);
    return;
  }
  const v8f vm = splat(m), floor = splat(kLogitFloor);
  v8f thr = kTopk ? splat(topk->logit[topk->k - 1]) : vm;
  v8f sl = splat(0.f);
  v8f sa[V];
  for (int v = 0; v < V; ++v) sa[v] = splat(0.f);
  int64_t j = 0;
#pragma GCC unroll 2
  for (; j + 8 <= nk; j += 8) {  // unrolled: two independent exp chains in flight
    v8f x = load8(s + j);
    if constexpr (kBias) x += load8(bias + j);
    if constexpr (kTopk) topk->offer8(x, idx0 + j, thr);
    x -= vm;
    if (!any_lane(x > floor)) continue;  // every weight below e^-80 of the max: negligible
    v8f w = exp8_fast(x);
    sl += w;
    for (int v = 0; v < V; ++v) sa[v] += w * load8(valsT + v * ldv + j);
  }
  double tl = hsum(sl);
  double ta[V];
  for (int v = 0; v < V; ++v) ta[v] = hsum(sa[v]);
  for (; j < nk; ++j) {
    float x = s[j];
    if constexpr (kBias) x += bias[j];
    if constexpr (kTopk) topk->offer(x, idx0 + j);
    x = std::max(x - m, kLogitFloor);
    double w = std::exp(static_cast<double>(x));
    tl += w;
    for (int v = 0; v < V; ++v) ta[v] += w * valsT[v * ldv + j];
  }
  l += tl;
  for (int v = 0; v < V; ++v) acc[v] += ta[v];
}

// Fold one row of scores (s + bias) into (m, l, acc): pass 1 finds the row max (and top-k candidates, rare
// after the first tiles), pass 2 the weights.
template <int V>
void fold_row(const float* s, const float* bias, const float* valsT, int64_t ldv, int64_t nk, float& m,
              double& l, double* acc, RowTopk* topk, int64_t idx0) {
  v8f vmax = splat(-INFINITY);
  v8f thr = topk ? splat(topk->logit[topk->k - 1]) : vmax;
  int64_t j = 0;
  for (; j + 8 <= nk; j += 8) {
    v8f x = load8(s + j) + load8(bias + j);
    vmax = x > vmax ? x : vmax;
    if (topk) topk->offer8(x, idx0 + j, thr);
  }
  float mx = hmax(vmax);
  for (; j < nk; ++j) {
    float x = s[j] + bias[j];
    mx = std::max(mx, x);
    if (topk) topk->offer(x, idx0 + j);
  }
  fold_weights<V, true>(s, bias, valsT, ldv, nk, mx, m, l, acc);
}

// Fold one row of biased logits whose max mx is already known (direct path): top-k candidates are searched,
// in the weight sweep, only when the row holds a logit above the current k-th largest.
template <int V>
void fold_logit_row(const float* s, float mx, const float* valsT, int64_t ldv, int64_t nk, float& m,
                    double& l, double* acc, RowTopk* topk, int64_t idx0) {
  if (topk && mx > topk->logit[topk->k - 1])
    fold_weights<V, false, true>(s, nullptr, valsT, ldv, nk, mx, m, l, acc, topk, idx0);
  else
    fold_weights<V, false>(s, nullptr, valsT, ldv, nk, mx, m, l, acc);
}

struct Problem {
  int64_t G, Q, K, D, V;
  const float* q; int64_t q_gs;
  const float* keys; int64_t k_gs;    // [K, D] per group (BLAS path)
  const float* keysP; int64_t kP_gs;  // [ceil(K / 16), D, 16] per group (direct path)
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
  std::vector<float> row_max(static_cast<size_t>(nq));
  if (p.topk > 0)
    for (int64_t i = 0; i < nq; ++i)
      tops.push_back({p.topk, p.tk_logit + (g * p.Q + q0 + i) * p.topk, p.tk_index + (g * p.Q + q0 + i) * p.topk});
  for (int64_t k0 = 0; k0 < p.K; k0 += p.block_k) {
    const int64_t nk = std::min(p.block_k, p.K - k0);
    float* S = tile.data();
    const int64_t lds = p.block_k;
    const float* bias = p.bias + g * p.b_gs + k0;
    const float* valsT = p.valsT + g * p.v_gs + k0;
    if (p.sgemm) {
      // column-major view: S^T [nk, nq] = keys_tile [nk, D] * q^T [D, nq]
      const int m_ = static_cast<int>(nk), n_ = static_cast<int>(nq), k_ = static_cast<int>(p.D);
      const int lda = static_cast<int>(p.D), ldb = static_cast<int>(p.D), ldc = static_cast<int>(lds);
      const float beta = 0.f;
      p.sgemm("T", "N", &m_, &n_, &k_, &alpha, p.keys + g * p.k_gs + k0 * p.D, &lda, q, &ldb, &beta, S, &ldc);
      for (int64_t i = 0; i < nq; ++i)
        fold_row<V>(S + i * lds, bias, valsT, p.K, nk, m[i], l[i], acc + i * V,
                    p.topk > 0 ? &tops[i] : nullptr, p.key_offset + k0);
    } else {
      direct_tile(q, p.D, nq, p.keysP + g * p.kP_gs + k0 * p.D, nk, alpha, bias, S, lds, row_max.data());
      for (int64_t i = 0; i < nq; ++i)
        fold_logit_row<V>(S + i * lds, row_max[i], valsT, p.K, nk, m[i], l[i], acc + i * V,
                          p.topk > 0 ? &tops[i] : nullptr, p.key_offset + k0);
    }
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

int sf_kernel_version() { return 2; }

// Returns 0 on success, 1 for an unsupported value dimension or (direct path) a key tile that is not a
// multiple of 16 keys.
int sf_accumulate(int64_t G, int64_t Q, int64_t K, int64_t D, int64_t V,
                  const float* q, int64_t q_gs, const float* keys, int64_t k_gs, const float* keysP, int64_t kP_gs,
                  const float* bias, int64_t b_gs, const float* valsT, int64_t v_gs, const float* scale,
                  int64_t s_gs, float* m, float* l, float* acc, int64_t topk, float* tk_logit,
                  int64_t* tk_index, int64_t key_offset, int64_t block_q, int64_t block_k, int nthreads,
                  void* sgemm) {
  Problem p{G, Q, K, D, V, q, q_gs, keys, k_gs, keysP, kP_gs, bias, b_gs, valsT, v_gs, scale, s_gs,
            m, l, acc, topk, tk_logit, tk_index, key_offset, block_q, block_k, reinterpret_cast<sgemm_fn>(sgemm)};
  if (!p.sgemm && p.block_k % kPanel != 0) return 1;
  switch (V) {
    case 1: run_all<1>(p, nthreads); return 0;
    case 2: run_all<2>(p, nthreads); return 0;
    case 3: run_all<3>(p, nthreads); return 0;
    case 4: run_all<4>(p, nthreads); return 0;
    default: return 1;
  }
}

}  // extern "C"

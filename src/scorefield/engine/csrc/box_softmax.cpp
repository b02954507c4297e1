// Box-sum patch posterior: the ELS machine with circular padding (Kamb & Ganguli eq. 9-10 / 39-40) for whole
// query images against whole training images, with every patch distance computed as a box sum.
//
// For a query image Q (noisy sample b, ᾱ_b, a = √ᾱ_b, s² = 1 − ᾱ_b) and a training image K, the squared distance
// between the query patch at pixel u and the scaled key patch at pixel v = u − δ (circular) is
//     S(u, δ) = Σ_{o ∈ Ω_P} Σ_c (Q_c[u + o] − a K_c[u + o − δ])²,
// the P×P box sum, at u, of the image p_δ[x] = Σ_c (Q_c[x] − a K_c[x − δ])². For each displacement δ the image
// p_δ costs 2C flops per pixel and its box sum O(log P) adds per pixel (window sums built by doubling: levels
// L_j[x] = L_{j−1}[x] + L_{j−1}[x + 2^{j−1}], the window of P the sum of the levels of P's binary digits), so a
// (query pixel, key patch) pair costs O(C + log P) instead of the O(P²·C) of a dot product, and because every
// term is a non-negative square there is no cancellation: the float32 distance is accurate to a few ulp of
// itself at any noise level.
//
// Lanes run over the horizontal displacement dx (W rounded up to a multiple of 8), so that the horizontal box
// sum is a sum of whole vectors and the vertical one of whole rows. When W ≡ 4 (mod 8) and H is even (MNIST's
// 28×28) the lanes instead run over two vertical shifts at once, (dy, dx) and (dy + 1, dx): 2W lanes, a whole
// number of vectors, so no lane is padding (one vector straddles the two key rows and is loaded as a blend). Each query pixel keeps a running max m,
// weight sum l and weighted centre-pixel sum acc (the streaming log-sum-exp of scorefield.engine.softmax);
// the logits of one query pixel against the W displacements dx of one (key image, dy) are a "group": when all
// of a group lie below m − threshold its exp is skipped (each such key weighs less than e^−threshold of the
// running max, which the caller turns into a certified bound on the neglected mass), else the group is folded
// with the clamped polynomial exp of simd.h. Threads take key images; their states merge at the end.
// Plain C ABI for ctypes.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif
#include "lse_state.h"
#include "simd.h"

namespace {

using namespace sf_simd;

inline int64_t wrap(int64_t i, int64_t n) { return ((i % n) + n) % n; }
// i mod n for i in [−n, 2n), without a division (the hot loops' indices all lie there)
inline int64_t wrap1(int64_t i, int64_t n) { return i < 0 ? i + n : (i >= n ? i - n : i); }

// Logits are in log2 units inside the kernel, the caller's state in natural units (lse_state.h).
// Per query pixel of every sample: the running max m (log2 units), weight sum l and weighted sum acc (relative
// to 2^m) of the keys this thread folded, the arg-max key, and the skip floor: a key whose logit lies below it
// weighs less than tol/K of the pixel's total mass (K keys per pixel), because floor ≤ log2(mass known so far)
// − T·log2 e with T = ln(K/tol) (the known mass: this thread's, or the state passed in by the caller, both below
// the total).
struct State {
  std::vector<float> m, floor;
  std::vector<double> l, acc;
  std::vector<int64_t> best;
  int64_t folded = 0, skipped = 0;
  State(int64_t nq, int64_t C, const double* m0, const double* l0, float threshold)
      : m(nq, -INFINITY), floor(nq), l(nq, 0.0), acc(nq * C, 0.0), best(nq, -1) {
    for (int64_t q = 0; q < nq; ++q)
      floor[q] = sf_lse::skip_floor(m0[q], l0[q], threshold);
  }
};

struct Geometry {
  int64_t C, H, W, P, Wp, G;  // Wp = W rounded up to 8; G vectors (8G lanes) per group: Wp / 8, or 2W / 8 paired
  int64_t L;                  // lanes per group, 8G
};

constexpr int64_t kMargin = 4;  // reversed rows start this many floats in: the paired layout's straddling load

// Row r of a reversed array (reversed_key / key_bias layout): rows of kMargin + jw floats, indexed from −kMargin.
inline int64_t row_start(int64_t r, int64_t jw) { return kMargin + r * (kMargin + jw); }

// KR[c][r][j] = K[c][r][(W − 1 − j) mod W] for −kMargin ≤ j < W − 1 + Wp: the 8-lane load at j0 = W − 1 − x
// gives K[c][r][x − dx] for dx = lane (mod W).
void reversed_key(const float* key, const Geometry& g, float* kr) {
  const int64_t jw = g.W - 1 + g.Wp;
  for (int64_t c = 0; c < g.C; ++c)
    for (int64_t r = 0; r < g.H; ++r)
      for (int64_t j = -kMargin, x = wrap(g.W - 1 + kMargin, g.W); j < jw; ++j, x = x == 0 ? g.W - 1 : x - 1)
        kr[row_start(c * g.H + r, jw) + j] = key[(c * g.H + r) * g.W + x];  // x = (W − 1 − j) mod W
}

// The key bias in the reversed layout of reversed_key: kb[r][j] = logw for the key patch centred at
// (r, (W − 1 − j) mod W), or −inf when that P×P patch is constant (every value, every channel, equal to
// const_value): those keys are folded once per query pixel by the caller as one key with their multiplicity,
// so they are left out here (a NaN const_value matches nothing).
void key_bias(const float* key, const Geometry& g, float logw, float const_value, int32_t* work, float* kb) {
  const int64_t jw = g.W - 1 + g.Wp, h = g.P / 2, hw = g.H * g.W;
  int32_t* odd = work;          // 1 where some channel differs from const_value
  int32_t* across = work + hw;  // horizontal window counts
  for (int64_t i = 0; i < hw; ++i) {
    int32_t differs = 0;
    for (int64_t c = 0; c < g.C; ++c) differs |= !(key[c * hw + i] == const_value);
    odd[i] = differs;
  }
  for (int64_t y = 0; y < g.H; ++y)
    for (int64_t x = 0; x < g.W; ++x) {
      int32_t count = 0;
      for (int64_t o = -h; o <= h; ++o) count += odd[y * g.W + wrap1(x + o, g.W)];
      across[y * g.W + x] = count;
    }
  for (int64_t r = 0; r < g.H; ++r)
    for (int64_t j = -kMargin, x = wrap(g.W - 1 + kMargin, g.W); j < jw; ++j, x = x == 0 ? g.W - 1 : x - 1) {
      int32_t count = 0;  // x = (W − 1 − j) mod W
      for (int64_t o = -h; o <= h; ++o) count += across[wrap1(r + o, g.H) * g.W + x];
      kb[row_start(r, jw) + j] = count == 0 ? -INFINITY : logw;
    }
}

struct Scratch {
  std::vector<float> kr, kb;         // reversed key image (see reversed_key) and its key bias (key_bias)
  std::vector<int32_t> work;
  std::vector<int32_t> prow, rows, vrun;  // p_δ of one row [x][lane]; horizontal sums R[y][x][lane]; vertical
  std::vector<int64_t> xin, xout, yin, yout;  // circular slide tables: entering / leaving index of window at i
  std::vector<int64_t> offs_x, offs_y;         // the P offsets −h..h, wrapped
  explicit Scratch(const Geometry& g)
      : kr(g.C * g.H * (kMargin + g.W - 1 + g.Wp)), kb(g.H * (kMargin + g.W - 1 + g.Wp)), work(2 * g.H * g.W),
        prow(g.W * g.L), rows(g.H * g.W * g.L), vrun(g.W * g.L),
        xin(g.W), xout(g.W), yin(g.H), yout(g.H), offs_x(g.P), offs_y(g.P) {
    const int64_t h = g.P / 2;
    for (int64_t x = 0; x < g.W; ++x) { xin[x] = wrap(x + h, g.W); xout[x] = wrap(x - h - 1, g.W); }
    for (int64_t y = 0; y < g.H; ++y) { yin[y] = wrap(y + h, g.H); yout[y] = wrap(y - h - 1, g.H); }
    for (int64_t o = 0; o < g.P; ++o) { offs_x[o] = wrap(o - h, g.W); offs_y[o] = wrap(o - h, g.H); }
  }
};


inline v8i load8i(const int32_t* p) { v8i v; std::memcpy(&v, p, sizeof v); return v; }
inline void store8i(int32_t* p, v8i v) { std::memcpy(p, &v, sizeof v); }

// Vector v of a group's lanes from reversed rows (reversed_key / key_bias layout), for the query column with
// offset off = W − 1 − x: padded layout, all lanes from row `first` (lane = dx); paired layout (PAIR, W = 4G),
// lanes < W from row `first` (key row r, lane = dx) and lanes ≥ W from row `second` (key row r − 1, lane − W = dx).
template <int64_t G, bool PAIR>
inline v8f group_load(const float* __restrict first, const float* __restrict second, int64_t off, int64_t v) {
  if constexpr (!PAIR) {
    return load8(first + off + 8 * v);
  } else {
    constexpr int64_t W = 4 * G, straddle = G / 2;  // vector `straddle` holds lanes W − 4 .. W + 3
    if (v < straddle) return load8(first + off + 8 * v);
    if (v > straddle) return load8(second + off + 8 * v - W);
    const v8i high = {0, 0, 0, 0, -1, -1, -1, -1};
    return high ? load8(second + off - 4) : load8(first + off + 8 * v);
  }
}

// The key (row, dx) of lane i of a group: (r, i), or in the paired layout (r − 1, i − W) for i ≥ W.
template <bool PAIR>
inline void lane_key(int64_t i, int64_t r, int64_t r2, int64_t W, int64_t& row, int64_t& dx) {
  if (PAIR && i >= W) { row = r2; dx = i - W; } else { row = r; dx = i; }
}

// The running state of one sample's pixels while one key image is folded: m (running max), l, acc and best
// point into the thread's State; lsum [q][lane] and asum [q][c][lane] are lane-wise sums relative to m,
// added into l and acc in double once per key image (flush_sums).
struct Fold {
  float* __restrict m;
  float* __restrict floor;
  double* __restrict l;
  double* __restrict acc;
  int64_t* __restrict best;
  float* __restrict lsum;
  float* __restrict asum;
  int64_t folded = 0, skipped = 0;
};

// Fold the logits lg (lane max vmax) of query pixel qs (column x; key row r, and r2 = r − 1 in the paired
// layout) against the keys of one group (key image n; the W shifts dx of one dy, or of dy and dy + 1 when
// paired): skipped when all lie below the pixel's skip floor, else all exp'd and summed with their C centre
// values. Returns the pairs folded.
template <int64_t G, int64_t C, bool PAIR>
inline int64_t fold_group(const v8f* lg, v8f vmax, const Geometry& g, const float* __restrict kr, int64_t r,
                          int64_t r2, int64_t x, float threshold, v8f last_lane_one, int64_t n, int64_t qs,
                          Fold& f) {
  if (!any_lane(vmax >= f.floor[qs])) return 0;
  const float mq0 = f.m[qs];
  float* __restrict ls = f.lsum + qs * 8;
  float* __restrict as = f.asum + qs * C * 8;
  if (any_lane(vmax > mq0)) {  // a new running max: rescale this pixel's sums, remember the arg-max key
    const float gmax = hmax(vmax);
    const double scale = std::exp2(static_cast<double>(mq0) - gmax);  // 0 for an empty state
    f.l[qs] *= scale;
    const v8f fs = splat(static_cast<float>(scale));
    store8(ls, load8(ls) * fs);
    for (int64_t c = 0; c < C; ++c) {
      f.acc[qs * C + c] *= scale;
      store8(as + 8 * c, load8(as + 8 * c) * fs);
    }
    f.m[qs] = gmax;
    f.floor[qs] = std::max(f.floor[qs], gmax - threshold);  // the new max key alone has mass 2^gmax
    int64_t lane = 0, row = r, dx = 0;
    for (int64_t i = 0; i < 8 * G; ++i)
      if (lg[i / 8][i % 8] == gmax) { lane = i; break; }
    lane_key<PAIR>(lane, r, r2, g.W, row, dx);
    f.best[qs] = (n * g.H + row) * g.W + wrap1(x - dx, g.W);
  }
  const v8f mq = splat(f.m[qs]);
  const int64_t jw = g.W - 1 + g.Wp, off = g.W - 1 - x;
  v8f wsum = load8(ls), vs[C];
  for (int64_t c = 0; c < C; ++c) vs[c] = load8(as + 8 * c);
  const float* __restrict first = kr + row_start(r, jw);  // channel c: + c · channel_stride
  const float* __restrict second = kr + row_start(r2, jw);
  const int64_t channel_stride = g.H * (kMargin + jw);
  for (int64_t v = 0; v < G; ++v) {  // the whole group: a branch per vector mispredicts more than it saves
    v8f w = exp2_8_fast(lg[v] - mq);
    if (!PAIR && v == G - 1) w *= last_lane_one;
    wsum += w;
    for (int64_t c = 0; c < C; ++c)
      vs[c] += w * group_load<G, PAIR>(first + c * channel_stride, second + c * channel_stride, off, v);
  }
  store8(ls, wsum);
  for (int64_t c = 0; c < C; ++c) store8(as + 8 * c, vs[c]);
  return PAIR ? g.L : g.W;
}

// Add the lane-wise sums of one sample's pixels (relative to their running max) into its double state, and
// raise each pixel's skip floor to log2(its mass so far) − threshold (log2 units).
void flush_sums(const Geometry& g, float threshold, Fold& f) {
  const int64_t hw = g.H * g.W;
  for (int64_t qs = 0; qs < hw; ++qs) {
    f.l[qs] += hsum(load8(f.lsum + qs * 8));
    store8(f.lsum + qs * 8, splat(0.f));
    if (f.l[qs] >= 1.0)  // log2 l ≥ the binary exponent of l: a valid floor without a log per pixel
      f.floor[qs] = std::max(f.floor[qs], f.m[qs] + std::ilogb(f.l[qs]) - threshold);
    for (int64_t c = 0; c < g.C; ++c) {
      float* as = f.asum + (qs * g.C + c) * 8;
      f.acc[qs * g.C + c] += hsum(load8(as));
      store8(as, splat(0.f));
    }
  }
}

// Horizontal window sums of p_δ for row y (key row r; r2 = r − 1 for the paired layout's upper lanes):
// p = round(Σ_c (σq_c − σa K_c)²) in fixed point (σ² the sample's scale), so the sliding sums are exact integer
// arithmetic: R[y][x] = Σ_{|o|≤h} p[x + o].
template <int64_t G, int64_t C, bool PAIR>
inline void horizontal_row(const float* __restrict query, float sigma, float sigma_a, const Geometry& g,
                           Scratch& s, int64_t y, int64_t r, int64_t r2) {
  const int64_t jw = g.W - 1 + g.Wp, Wp = g.L;
  int32_t* __restrict prow = s.prow.data();
  const float* __restrict kr = s.kr.data();
  for (int64_t x = 0; x < g.W; ++x) {
    v8f acc[G];
    for (int64_t v = 0; v < G; ++v) acc[v] = splat(0.5f);  // + 0.5, then truncation: round to nearest
    for (int64_t c = 0; c < C; ++c) {
      const float qv = sigma * query[(c * g.H + y) * g.W + x];
      const float* __restrict first = kr + row_start(c * g.H + r, jw);
      const float* __restrict second = kr + row_start(c * g.H + r2, jw);
      for (int64_t v = 0; v < G; ++v) {
        const v8f diff = qv - sigma_a * group_load<G, PAIR>(first, second, g.W - 1 - x, v);
        acc[v] += diff * diff;
      }
    }
    for (int64_t v = 0; v < G; ++v) store8i(prow + x * Wp + 8 * v, __builtin_convertvector(acc[v], v8i));
  }
  v8i run[G];
  for (int64_t v = 0; v < G; ++v) run[v] = v8i{0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t o = 0; o < g.P; ++o)
    for (int64_t v = 0; v < G; ++v) run[v] += load8i(prow + s.offs_x[o] * Wp + 8 * v);
  int32_t* __restrict out = s.rows.data() + y * g.W * Wp;
  const int64_t* __restrict xin = s.xin.data();
  const int64_t* __restrict xout = s.xout.data();
  for (int64_t v = 0; v < G; ++v) store8i(out + 8 * v, run[v]);
  for (int64_t x = 1; x < g.W; ++x) {
    const int32_t* __restrict in = prow + xin[x] * Wp;
    const int32_t* __restrict old = prow + xout[x] * Wp;
    for (int64_t v = 0; v < G; ++v) {
      run[v] += load8i(in + 8 * v) - load8i(old + 8 * v);
      store8i(out + x * Wp + 8 * v, run[v]);
    }
  }
}

// One (sample, key image, dy): the distances of all H·W query pixels to the W key patches of this row shift
// (and of dy + 1 in the paired layout), as vertical sliding sums of the horizontal ones (exact in fixed point),
// folded row by row as they are made.
template <int64_t G, int64_t C, bool PAIR>
void fold_shift(const float* query, float sigma, float sigma_a, float coef, float threshold,
                const Geometry& g, Scratch& s, v8f last_lane_one, v8f last_lane_bias, int64_t n, int64_t dy,
                Fold& f) {
  for (int64_t y = 0; y < g.H; ++y) {
    const int64_t r = wrap1(y - dy, g.H);
    horizontal_row<G, C, PAIR>(query, sigma, sigma_a, g, s, y, r, r == 0 ? g.H - 1 : r - 1);
  }
  const int64_t row = g.W * g.L, Wp = g.L;
  const v8f scale = splat(-coef);
  const int64_t jw = g.W - 1 + g.Wp;
  int32_t* __restrict run = s.vrun.data();  // the vertical window sums of the current row, all columns
  const int32_t* __restrict rows = s.rows.data();
  const float* __restrict kr = s.kr.data();
  int64_t folded = 0;
  std::memset(run, 0, row * sizeof(int32_t));
  for (int64_t o = 0; o < g.P; ++o) {
    const int32_t* __restrict src = rows + s.offs_y[o] * row;
    for (int64_t i = 0; i < row; i += 8) store8i(run + i, load8i(run + i) + load8i(src + i));
  }
  for (int64_t y = 0; y < g.H; ++y) {
    const int32_t* __restrict in = rows + s.yin[y] * row;
    const int32_t* __restrict old = rows + s.yout[y] * row;
    const int64_t r = wrap1(y - dy, g.H), r2 = r == 0 ? g.H - 1 : r - 1;
    const float* __restrict kb_first = s.kb.data() + row_start(r, jw);
    const float* __restrict kb_second = s.kb.data() + row_start(r2, jw);
    for (int64_t x = 0; x < g.W; ++x) {
      v8f lg[G];
      v8f vmax = splat(-INFINITY);
      for (int64_t v = 0; v < G; ++v) {
        const int64_t i = x * Wp + 8 * v;
        v8i d = load8i(run + i);
        if (y > 0) {
          d += load8i(in + i) - load8i(old + i);
          store8i(run + i, d);
        }
        lg[v] = __builtin_convertvector(d, v8f) * scale + group_load<G, PAIR>(kb_first, kb_second, g.W - 1 - x, v);
        if (!PAIR && v == G - 1) lg[v] += last_lane_bias;
        vmax = lg[v] > vmax ? lg[v] : vmax;
      }
      folded += fold_group<G, C, PAIR>(lg, vmax, g, kr, r, r2, x, threshold, last_lane_one, n, y * g.W + x, f);
    }
  }
  f.folded += folded;
  f.skipped += g.H * g.W * (PAIR ? g.L : g.W) - folded;
}


}  // namespace

extern "C" {

// Fold key images [N, C, H, W] (per-image log-weight key_logw [N]) into the running state of every pixel of the
// query images [B, C, H, W]: sample b at a[b] = √ᾱ_b, inv2s2[b] = 1 / (2(1 − ᾱ_b)), fixed_scale[b] the
// fixed-point scale of its squared differences (P²·max p·scale must stay below 2^31). m, l [B·H·W] and acc
// [B·H·W, C] are a streaming log-sum-exp state in double (m = -inf, l = acc = 0 to start); best [B·H·W] gets
// the flat index ((image_offset + n)·H + y)·W + x of the arg-max key patch (may be null). counts[0] += pairs
// folded, counts[1] += pairs skipped: each weighs below e^−threshold of its query pixel's total mass, so with
// threshold = ln(K/tol) for K keys per pixel the skipped ones hold less than tol of it (see State). Key patches
// constant at const_value are left out (the caller folds them as one key with their multiplicity; NaN: none).
// Returns 0, or 1 for a configuration it does not cover (P even or above H or W, W > 64, C > 4).
int sf_box_posterior(int64_t B, int64_t N, int64_t C, int64_t H, int64_t W, int64_t P, const float* queries,
                     const float* keys, const float* key_logw, const float* a, const float* inv2s2,
                     const float* fixed_scale, float threshold, float const_value, double* m, double* l,
                     double* acc, int64_t* best, int64_t* counts, int64_t image_offset, int threads) {
  if (B < 1 || N < 1 || C < 1 || C > 4 || H < 1 || W < 1 || P < 1 || P % 2 == 0 || P > H || P > W) return 1;
  const int64_t Wp = (W + 7) / 8 * 8;
  if (Wp / 8 > 8) return 1;
  const bool paired = W % 8 == 4 && H % 2 == 0 && W <= 28;  // 2W lanes = W / 4 vectors (odd), ≤ 7
  const Geometry g{C, H, W, P, Wp, paired ? W / 4 : Wp / 8, paired ? 2 * W : Wp};
  v8f lane_one = splat(1.f), lane_bias = splat(0.f);  // of the last vector of a group: lanes dx ≥ W are padding
  for (int i = 0; i < 8; ++i)
    if (Wp - 8 + i >= W) {
      lane_one[i] = 0.f;
      lane_bias[i] = -INFINITY;
    }
  const int64_t nq = B * H * W, image = C * H * W;
#ifdef _OPENMP
  if (threads < 1) threads = 1;
#pragma omp parallel num_threads(threads)
#endif
  {
    State st(nq, C, m, l, threshold);
    const float threshold2 = threshold * kLog2e;  // in log2 units, as the logits
    Scratch s(g);
    std::vector<float> lsum(H * W * 8, 0.f), asum(H * W * C * 8, 0.f);
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
    for (int64_t n = 0; n < N; ++n) {
      reversed_key(keys + n * image, g, s.kr.data());
      key_bias(keys + n * image, g, key_logw[n] * kLog2e, const_value, s.work.data(), s.kb.data());
      for (int64_t b = 0; b < B; ++b) {
        const int64_t q0 = b * H * W;
        Fold f{st.m.data() + q0, st.floor.data() + q0, st.l.data() + q0, st.acc.data() + q0 * C, st.best.data() + q0, lsum.data(),
               asum.data()};
        const float* qb = queries + b * image;
        const float sigma = std::sqrt(fixed_scale[b]), coef = inv2s2[b] / fixed_scale[b] * kLog2e;
        const int64_t dy_step = paired ? 2 : 1;
        for (int64_t dy = 0; dy < H; dy += dy_step) {
          switch (g.G * 16 + C * 2 + (paired ? 1 : 0)) {
#define SF_FOLD_CASE(n_vec, n_ch, pair)                                                                  \
  case n_vec * 16 + n_ch * 2 + (pair ? 1 : 0):                                                           \
    fold_shift<n_vec, n_ch, pair>(qb, sigma, sigma * a[b], coef, threshold2, g, s, lane_one,             \
                                  lane_bias, n + image_offset, dy, f);                                   \
    break;
#define SF_FOLD_CASES(n_vec, pair) \
  SF_FOLD_CASE(n_vec, 1, pair) SF_FOLD_CASE(n_vec, 2, pair) SF_FOLD_CASE(n_vec, 3, pair) SF_FOLD_CASE(n_vec, 4, pair)
            SF_FOLD_CASES(1, false) SF_FOLD_CASES(2, false) SF_FOLD_CASES(3, false) SF_FOLD_CASES(4, false)
            SF_FOLD_CASES(5, false) SF_FOLD_CASES(6, false) SF_FOLD_CASES(7, false) SF_FOLD_CASES(8, false)
            SF_FOLD_CASES(1, true) SF_FOLD_CASES(3, true) SF_FOLD_CASES(5, true) SF_FOLD_CASES(7, true)
#undef SF_FOLD_CASES
#undef SF_FOLD_CASE
          }
        }
        flush_sums(g, threshold2, f);
        st.folded += f.folded;
        st.skipped += f.skipped;
      }
    }
#ifdef _OPENMP
#pragma omp critical
#endif
    {
      sf_lse::merge_state(st.m.data(), st.l.data(), st.acc.data(), st.best.data(), nq, C, m, l, acc, best);
      counts[0] += st.folded;
      counts[1] += st.skipped;
    }
  }
  return 0;
}

}  // extern "C"

// Multi-size box-sum patch posterior: the ELS machine with circular padding (Kamb & Ganguli eq. 9-10 / 39-40)
// and the boundary-broken ELS machine with zero padding (eq. 41) at several patch sizes P_1 < … < P_S from one
// pass over the training images (calibration, App. C.2).
//
// For a query image Q (sample b, a = √ᾱ_b, s² = 1 − ᾱ_b) and a training image K, the squared distance between
// the query patch at pixel u and the scaled key patch at v = u − δ (circular) is, at every size P, the P×P box
// sum at u of the same image p_δ[x] = Σ_c (Q_c[x] − a K_c[x − δ])² (see box_softmax.cpp; with zero padding and
// a key of u's border class, the box sum over the part of the window inside the image). Here p_δ is formed
// once per (sample, key image, δ), rounded to exact fixed-point integers, and turned into one integral image (a
// prefix-sum table over the image extended by the largest radius on every side, circularly or with zeros, held
// modulo 2^32: every window sum below 2^31 comes out exact); the window sum of any size is then four table
// reads. Each
// size keeps its own streaming log-sum-exp state per query pixel (running max m, weight sum l, weighted centre
// sum acc) and its own skip floor: the logits of one query pixel against the W horizontal shifts dx of one
// (key image, dy) form a group, skipped at a size when all of them lie below that size's floor (each such key
// weighs less than e^−threshold of the pixel's mass at that size), else exp'd with the clamped polynomial exp
// of simd.h. The centre values K(u − δ) are the same at every size. Threads take key images; their states merge
// at the end. Plain C ABI for ctypes.
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

typedef uint32_t v8u __attribute__((vector_size(32)));

constexpr int64_t kMaxSizes = 64;

inline int64_t wrap(int64_t i, int64_t n) { return ((i % n) + n) % n; }

struct Geometry {
  int64_t C, H, W, Wp, G, S, R;  // Wp = W rounded up to 8, G = Wp / 8 vectors per group, S sizes, R max radius
  int64_t EH, EW;                // rows and columns of the integral image: H + 2R + 1, W + 2R + 1
  bool border;                   // zero padding, keys of the query's border class (bbELS); else circular ELS
  int64_t radius[kMaxSizes];
};

// Which keys of a group a size admits. Circular ELS: every real lane (dx < W). Border classes (bbELS, eq. 41):
// the key (row r, column x − dx) when its distances to the four borders, capped at the size's radius, equal the
// query pixel's; the rows are checked per group (vclass), the columns per lane (keep: all ones where admitted,
// lane_bias: 0 there, −inf elsewhere; valid: how many). A class at a larger radius refines the one at a smaller,
// so a size admits a subset of the keys the smaller sizes admit.
struct Masks {
  std::vector<int64_t> vclass;   // [S][H]
  std::vector<v8u> keep;         // [S][W][G]
  std::vector<v8f> lane_bias;    // [S][W][G]
  std::vector<int64_t> valid;    // [S][W]
  explicit Masks(const Geometry& g)
      : vclass(g.S * g.H, 0), keep(g.S * g.W * g.G), lane_bias(g.S * g.W * g.G), valid(g.S * g.W, 0) {
    for (int64_t k = 0; k < g.S; ++k) {
      const int64_t rad = g.radius[k];
      auto cls = [rad](int64_t i, int64_t n) { return std::min(i, rad) * (kMaxSizes + 1) + std::min(n - 1 - i, rad); };
      if (g.border)
        for (int64_t y = 0; y < g.H; ++y) vclass[k * g.H + y] = cls(y, g.H);
      for (int64_t x = 0; x < g.W; ++x)
        for (int64_t v = 0; v < g.G; ++v) {
          v8u kv = {};
          v8f bv = {};
          for (int lane = 0; lane < 8; ++lane) {
            const int64_t dx = 8 * v + lane;
            const bool ok = dx < g.W && (!g.border || cls(x, g.W) == cls(((x - dx) % g.W + g.W) % g.W, g.W));
            kv[lane] = ok ? ~0u : 0u;
            bv[lane] = ok ? 0.f : -INFINITY;
            valid[k * g.W + x] += ok;
          }
          keep[(k * g.W + x) * g.G + v] = kv;
          lane_bias[(k * g.W + x) * g.G + v] = bv;
        }
    }
  }
};

// Per (size s, query pixel q), index s·(B·H·W) + q: the running max m (log2 units), skip floor, weight sum l and
// weighted sum acc of the keys this thread folded (the caller's state gives the first floors, as in
// box_softmax.cpp), and per size the pairs folded and skipped.
struct State {
  std::vector<float> m, floor;
  std::vector<double> l, acc;
  std::vector<int64_t> folded, skipped;
  State(int64_t nqs, int64_t C, int64_t S, const double* m0, const double* l0, float threshold)
      : m(nqs, -INFINITY), floor(nqs), l(nqs, 0.0), acc(nqs * C, 0.0), folded(S, 0), skipped(S, 0) {
    for (int64_t i = 0; i < nqs; ++i)
      floor[i] = sf_lse::skip_floor(m0[i], l0[i], threshold);
  }
};

// KR[c][r][j] = K[c][r][(W − 1 − j) mod W] for 0 ≤ j < W − 1 + Wp: the 8-lane load at j0 = W − 1 − x gives
// K[c][r][x − dx] for dx = lane (mod W).
void reversed_key(const float* key, const Geometry& g, float* kr) {
  const int64_t jw = g.W - 1 + g.Wp;
  for (int64_t c = 0; c < g.C; ++c)
    for (int64_t r = 0; r < g.H; ++r)
      for (int64_t j = 0; j < jw; ++j) kr[(c * g.H + r) * jw + j] = key[(c * g.H + r) * g.W + wrap(g.W - 1 - j, g.W)];
}

struct Scratch {
  std::vector<float> kr;
  std::vector<uint32_t> prod, table;     // p_δ [H + 1][W + 1][lane] (row H, column W: zeros); integral image
                                         // [EH][EW][lane]
  std::vector<int64_t> ext_y, ext_x;     // row / column of p_δ at each extended index (wrapped, or the zeros)
  std::vector<float> lsum, asum;         // lane-wise sums of one sample's slots, [s][q][lane], [s][q][c][lane]
  std::vector<float> bound;              // [y][x] (fold_shift)
  explicit Scratch(const Geometry& g)
      : kr(g.C * g.H * (g.W - 1 + g.Wp)), prod((g.H + 1) * (g.W + 1) * g.Wp, 0u), table(g.EH * g.EW * g.Wp, 0u),
        ext_y(g.EH), ext_x(g.EW), lsum(g.H * g.W * g.S * 8, 0.f), asum(g.H * g.W * g.S * g.C * 8, 0.f),
        bound(g.H * g.W) {
    for (int64_t i = 1; i < g.EH; ++i) {
      const int64_t y = i - 1 - g.R;
      ext_y[i] = g.border && (y < 0 || y >= g.H) ? g.H : wrap(y, g.H);
    }
    for (int64_t j = 1; j < g.EW; ++j) {
      const int64_t x = j - 1 - g.R;
      ext_x[j] = g.border && (x < 0 || x >= g.W) ? g.W : wrap(x, g.W);
    }
  }
};

inline v8u load8u(const uint32_t* p) { v8u v; std::memcpy(&v, p, sizeof v); return v; }
inline void store8u(uint32_t* p, v8u v) { std::memcpy(p, &v, sizeof v); }

// p_δ for one (sample, key image, dy), all dx in the lanes: round(Σ_c (σq_c − σa K_c)²) in fixed point (σ² the
// sample's scale), then its integral image T[i][j] = Σ_{i' < i, j' < j} p[ext_y[i']][ext_x[j']] over the image
// extended by R on every side, circularly or with zeros (wrapping modulo 2^32, which window sums below 2^31
// survive exactly). With zeros a window sum is the sum over the part of the window inside the image: for a key
// of the query pixel's border class the parts of both patches outside the image coincide (zeros on both sides),
// and inside it the lane layout's wrapped key column (x − dx) mod W is the key's true column.
template <int64_t G, int64_t C>
void integral_image(const float* __restrict query, float sigma, float sigma_a, const Geometry& g, Scratch& s,
                    int64_t dy) {
  const int64_t jw = g.W - 1 + g.Wp, Wp = g.Wp;
  uint32_t* __restrict prod = s.prod.data();
  const float* __restrict kr = s.kr.data();
  for (int64_t y = 0; y < g.H; ++y) {
    const int64_t r = wrap(y - dy, g.H);
    for (int64_t x = 0; x < g.W; ++x) {
      v8f acc[G];
      for (int64_t v = 0; v < G; ++v) acc[v] = splat(0.5f);  // + 0.5, then truncation: round to nearest
      for (int64_t c = 0; c < C; ++c) {
        const float qv = sigma * query[(c * g.H + y) * g.W + x];
        const float* __restrict row = kr + (c * g.H + r) * jw + g.W - 1 - x;
        for (int64_t v = 0; v < G; ++v) {
          const v8f diff = qv - sigma_a * load8(row + 8 * v);
          acc[v] += diff * diff;
        }
      }
      for (int64_t v = 0; v < G; ++v)
        store8u(prod + (y * (g.W + 1) + x) * Wp + 8 * v,
                __builtin_convertvector(__builtin_convertvector(acc[v], v8i), v8u));
    }
  }
  uint32_t* __restrict t = s.table.data();
  const int64_t row = g.EW * Wp;
  for (int64_t i = 1; i < g.EH; ++i) {
    const uint32_t* __restrict prow = prod + s.ext_y[i] * (g.W + 1) * Wp;
    const uint32_t* __restrict above = t + (i - 1) * row;
    uint32_t* __restrict here = t + i * row;
    v8u run[G];
    for (int64_t v = 0; v < G; ++v) run[v] = v8u{0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t j = 1; j < g.EW; ++j) {
      const uint32_t* __restrict src = prow + s.ext_x[j] * Wp;
      for (int64_t v = 0; v < G; ++v) {
        run[v] += load8u(src + 8 * v);
        store8u(here + j * Wp + 8 * v, load8u(above + j * Wp + 8 * v) + run[v]);
      }
    }
  }
}

// Fold the group of one (query pixel, size) slot i (lane logits lg, max vmax, log2 units) into the thread's
// state (ls, as: the slot's lane-wise sums); the centre values of the group's keys are kc [C][G], the lanes
// the size admits `keep` (the clamped exp of the others' −inf logits is masked to exactly 0). Returns whether it
// was folded.
template <int64_t G, int64_t C>
inline bool fold_group(const v8f* lg, v8f vmax, const v8f* kc, float threshold, const v8u* keep, int64_t i,
                       State& st, float* __restrict ls, float* __restrict as) {
  if (!any_lane(vmax >= st.floor[i])) return false;
  const float mq0 = st.m[i];
  if (any_lane(vmax > mq0)) {  // a new running max: rescale this slot's sums
    const float gmax = hmax(vmax);
    const double scale = std::exp2(static_cast<double>(mq0) - gmax);  // 0 for an empty state
    st.l[i] *= scale;
    const v8f fs = splat(static_cast<float>(scale));
    store8(ls, load8(ls) * fs);
    for (int64_t c = 0; c < C; ++c) {
      st.acc[i * C + c] *= scale;
      store8(as + 8 * c, load8(as + 8 * c) * fs);
    }
    st.m[i] = gmax;
    st.floor[i] = std::max(st.floor[i], gmax - threshold);  // the new max key alone has mass 2^gmax
  }
  const v8f mq = splat(st.m[i]);
  v8f wsum = load8(ls), vs[C];
  for (int64_t c = 0; c < C; ++c) vs[c] = load8(as + 8 * c);
  for (int64_t v = 0; v < G; ++v) {
    const v8f w = reinterpret_cast<v8f>(reinterpret_cast<v8u>(exp2_8_fast(lg[v] - mq)) & keep[v]);
    wsum += w;
    for (int64_t c = 0; c < C; ++c) vs[c] += w * kc[c * G + v];
  }
  store8(ls, wsum);
  for (int64_t c = 0; c < C; ++c) store8(as + 8 * c, vs[c]);
  return true;
}

// One (sample, key image, dy): every query pixel's window sums at every size from the integral image, as logits,
// folded into the per-size states (q0: the sample's first query pixel), size by size in increasing order.
// Because every term of a window sum is non-negative, a key's distance only grows with the size, so the largest
// logit of a group at a smaller size bounds the group's logits at every larger size: once that bound lies below
// a larger size's floor the group is skipped there without forming its logits. The skip test itself runs on the
// integers: the group's smallest window sum gives its largest logit (the map d → −coef·d + bias is monotone).
template <int64_t G, int64_t C>
void fold_shift(const float* query, float sigma, float sigma_a, float coef, float bias, float threshold,
                const Geometry& g, const Masks& masks, Scratch& s, int64_t dy, int64_t q0, int64_t nq,
                State& st) {
  integral_image<G, C>(query, sigma, sigma_a, g, s, dy);
  const int64_t jw = g.W - 1 + g.Wp, Wp = g.Wp, S = g.S, row = g.EW * Wp, hw = g.H * g.W;
  const uint32_t* __restrict t = s.table.data();
  float* __restrict bound = s.bound.data();  // [y][x]: the group's largest logit at the last size formed
  const v8f scale = splat(-coef);
  int64_t folded[kMaxSizes] = {0}, pairs[kMaxSizes] = {0};
  std::fill(bound, bound + hw, INFINITY);
  for (int64_t k = 0; k < S; ++k) {  // size-major: each size streams through the table's rows in order
    const int64_t rad = g.radius[k];
    for (int64_t y = 0; y < g.H; ++y) {
      const int64_t r = wrap(y - dy, g.H);
      if (masks.vclass[k * g.H + y] != masks.vclass[k * g.H + r]) continue;  // key row outside the class
      const float* __restrict centre = s.kr.data() + r * jw + g.W - 1;  // channel c: + c·H·jw, column x: − x
      const uint32_t* __restrict top = t + (y + g.R - rad) * row;
      const uint32_t* __restrict bottom = t + (y + g.R + rad + 1) * row;
      const int64_t slot0 = k * nq + q0 + y * g.W;  // the state slot of (size k, pixel (y, 0))
      const int64_t lane0 = (k * hw + y * g.W) * 8;
      const v8u* __restrict keep_row = masks.keep.data() + k * g.W * G;
      const v8f* __restrict bias_row = masks.lane_bias.data() + k * g.W * G;
      const int64_t* __restrict valid = masks.valid.data() + k * g.W;
      int64_t count = 0;
      for (int64_t x = 0; x < g.W; ++x) {
        const int64_t i = slot0 + x;
        pairs[k] += valid[x];
        float& group_bound = bound[y * g.W + x];
        if (!(group_bound >= st.floor[i])) continue;
        const int64_t left = (x + g.R - rad) * Wp, right = (x + g.R + rad + 1) * Wp;
        v8u d[G];
        v8u dmin = ~v8u{0, 0, 0, 0, 0, 0, 0, 0};
        for (int64_t v = 0; v < G; ++v) {
          d[v] = load8u(bottom + right + 8 * v) - load8u(top + right + 8 * v) - load8u(bottom + left + 8 * v)
                 + load8u(top + left + 8 * v);
          const v8u dv = d[v] | ~keep_row[x * G + v];
          dmin = dv < dmin ? dv : dmin;
        }
        uint32_t nearest = dmin[0];
        for (int lane = 1; lane < 8; ++lane) nearest = std::min(nearest, static_cast<uint32_t>(dmin[lane]));
        group_bound = static_cast<float>(static_cast<int32_t>(nearest)) * -coef + bias;  // its largest logit
        if (!(group_bound >= st.floor[i])) continue;
        v8f lg[G];
        v8f vmax = splat(-INFINITY);
        for (int64_t v = 0; v < G; ++v) {
          lg[v] = __builtin_convertvector(reinterpret_cast<v8i>(d[v]), v8f) * scale + bias;
          lg[v] += bias_row[x * G + v];
          vmax = lg[v] > vmax ? lg[v] : vmax;
        }
        v8f kc[C * G];
        for (int64_t c = 0; c < C; ++c)
          for (int64_t v = 0; v < G; ++v) kc[c * G + v] = load8(centre + c * g.H * jw - x + 8 * v);
        if (fold_group<G, C>(lg, vmax, kc, threshold, keep_row + x * G, i, st, s.lsum.data() + lane0 + 8 * x,
                             s.asum.data() + (lane0 + 8 * x) * C))
          count += valid[x];
      }
      folded[k] += count;
    }
  }
  for (int64_t k = 0; k < S; ++k) {
    st.folded[k] += folded[k];
    st.skipped[k] += pairs[k] - folded[k];
  }
}

// Add the lane-wise sums of one sample's slots into its double state and raise each slot's floor to log2(its
// mass so far) − threshold (log2 units), as box_softmax.cpp's flush_sums.
void flush_sums(const Geometry& g, float threshold, int64_t q0, int64_t nq, State& st, Scratch& s) {
  const int64_t hw = g.H * g.W;
  for (int64_t k = 0; k < g.S; ++k)
    for (int64_t q = 0; q < hw; ++q) {
      const int64_t i = k * nq + q0 + q, lane = (k * hw + q) * 8;
      st.l[i] += hsum(load8(s.lsum.data() + lane));
      store8(s.lsum.data() + lane, splat(0.f));
      if (st.l[i] >= 1.0) st.floor[i] = std::max(st.floor[i], st.m[i] + std::ilogb(st.l[i]) - threshold);
      for (int64_t c = 0; c < g.C; ++c) {
        float* as = s.asum.data() + lane * g.C + 8 * c;
        st.acc[i * g.C + c] += hsum(load8(as));
        store8(as, splat(0.f));
      }
    }
}


}  // namespace

extern "C" {

// Fold key images [N, C, H, W] (log-weights key_logw [N]) into the running state of every (query pixel, size)
// of the query images [B, C, H, W] at the S odd sizes `sizes` (increasing, each ≤ min(H, W)): sample b at
// a[b] = √ᾱ_b, inv2s2[b] = 1 / (2(1 − ᾱ_b)), fixed_scale[b] the scale of its fixed-point squares (a window sum
// at the largest size must stay below 2^31). m, l [S·B·H·W] and acc [S·B·H·W, C] are streaming log-sum-exp
// states in double, slot s·B·H·W + b·H·W + pixel (m = -inf, l = acc = 0 to start). counts [S, 2] += pairs folded
// and skipped at each size (skipped ones weigh below e^−threshold of their slot's mass: threshold = ln(K/tol)
// for K keys per pixel bounds the skipped fraction by tol). Returns 0, or 1 for a configuration it does not
// cover (a size even, unsorted or above H or W; W > 64; C > 4; more than 64 sizes). border = 0: circular
// padding, every key patch (ELS); 1: zero padding, the keys of each query pixel's border class at each size
// (bbELS, eq. 41; K then counts the keys of the largest class).
int sf_multisize_posterior(int64_t B, int64_t N, int64_t C, int64_t H, int64_t W, int64_t S, const int64_t* sizes,
                           const float* queries, const float* keys, const float* key_logw, const float* a,
                           const float* inv2s2, const float* fixed_scale, float threshold, int border, double* m,
                           double* l, double* acc, int64_t* counts, int threads) {
  if (B < 1 || N < 1 || C < 1 || C > 4 || H < 1 || W < 1 || S < 1 || S > kMaxSizes) return 1;
  for (int64_t k = 0; k < S; ++k)
    if (sizes[k] < 1 || sizes[k] % 2 == 0 || sizes[k] > H || sizes[k] > W || (k > 0 && sizes[k] <= sizes[k - 1]))
      return 1;
  const int64_t Wp = (W + 7) / 8 * 8;
  if (Wp / 8 > 8) return 1;
  Geometry g{C, H, W, Wp, Wp / 8, S, sizes[S - 1] / 2, 0, 0, border != 0, {}};
  g.EH = H + 2 * g.R + 1;
  g.EW = W + 2 * g.R + 1;
  for (int64_t k = 0; k < S; ++k) g.radius[k] = sizes[k] / 2;
  const Masks masks(g);
  const int64_t nqs = B * H * W * S, image = C * H * W;
#ifdef _OPENMP
  if (threads < 1) threads = 1;
#pragma omp parallel num_threads(threads)
#endif
  {
    State st(nqs, C, S, m, l, threshold);
    const float threshold2 = threshold * kLog2e;  // in log2 units, as the logits
    Scratch s(g);
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
    for (int64_t n = 0; n < N; ++n) {
      reversed_key(keys + n * image, g, s.kr.data());
      const float bias = key_logw[n] * kLog2e;
      for (int64_t b = 0; b < B; ++b) {
        const float* qb = queries + b * image;
        const float sigma = std::sqrt(fixed_scale[b]), coef = inv2s2[b] / fixed_scale[b] * kLog2e;
        const int64_t q0 = b * H * W;
        for (int64_t dy = 0; dy < H; ++dy) {
          switch (g.G * 8 + C) {
#define SF_MS_CASE(n_vec, n_ch)                                                                              \
  case n_vec * 8 + n_ch:                                                                                      \
    fold_shift<n_vec, n_ch>(qb, sigma, sigma * a[b], coef, bias, threshold2, g, masks, s, dy, q0, B * H * W, st); \
    break;
#define SF_MS_CASES(n_vec) SF_MS_CASE(n_vec, 1) SF_MS_CASE(n_vec, 2) SF_MS_CASE(n_vec, 3) SF_MS_CASE(n_vec, 4)
            SF_MS_CASES(1) SF_MS_CASES(2) SF_MS_CASES(3) SF_MS_CASES(4)
            SF_MS_CASES(5) SF_MS_CASES(6) SF_MS_CASES(7) SF_MS_CASES(8)
#undef SF_MS_CASES
#undef SF_MS_CASE
          }
        }
        flush_sums(g, threshold2, q0, B * H * W, st, s);
      }
    }
#ifdef _OPENMP
#pragma omp critical
#endif
    {
      sf_lse::merge_state(st.m.data(), st.l.data(), st.acc.data(), nullptr, nqs, C, m, l, acc, nullptr);
      for (int64_t k = 0; k < S; ++k) {
        counts[2 * k] += st.folded[k];
        counts[2 * k + 1] += st.skipped[k];
      }
    }
  }
  return 0;
}

}  // extern "C"

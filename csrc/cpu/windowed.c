/* acnorm_fused._cpu: the C x C step of wide layers on the CPU, compiled.
 *
 * The same windowed algorithm as acnorm_fused/correlation.py (its docstrings
 * give the math): row i of S keeps the sorted source signatures u[lo_i ..
 * hi_i) around mid_i, the first u >= y_t[i], by the rule
 * |y_t[i] - u| <= |y_t[i] - y_s[i]| in the signatures' dtype. The PyTorch
 * version of it dispatches a few hundred small operations per training step,
 * each costing more than its arithmetic; here each product is a few O(C)
 * loops and the state a sort and a search per row.
 *
 * Plain C and the CPython API only: no C++ runtime to carry, so the module
 * builds in seconds with zig's C compiler for glibc 2.28 (or the system cc)
 * and needs nothing but libc. Buffers are passed as addresses of
 * contiguous CPU tensors that the Python side allocated and checked.
 *
 * Numerics. Every sum runs in double, with each row's exponentials taken
 * relative to its nearest source signature (distance d_i): with s = y / T,
 * the left terms are exp(s_u - s_t + d) and the right ones exp(s_t - s_u + d),
 * whose exponents never exceed zero, and the softmax denominator z' >= 1
 * (the nearest term is exp(0)). Prefix sums over the sorted u are kept
 * relative to their last term (P[m] = sum_{j<m} v_j exp(s_u[j] - s_u[m-1])),
 * suffix sums relative to their first: no exponential overflows or leaves a
 * sum without its largest terms, whatever the signatures' range against T,
 * so one scheme covers what the PyTorch version splits into a linear and a
 * log-domain case. Left parts are prefix-sum differences and right parts
 * suffix-sum differences, each dominated by the terms next to y_t[i].
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Rows of the (WINDOW_ROWS, C) state, as acnorm_fused.correlation.WINDOW_ROWS. */
enum { ROW_SOURCE, ROW_TARGET, ROW_ORDER, ROW_LO, ROW_MID, ROW_HI, WINDOW_ROWS };

/* A thread's work memory, kept between calls: freeing and mapping a few
 * hundred KiB afresh each call (glibc's malloc maps blocks this large) costs
 * page faults worth as much as the work itself. It grows to the widest layer
 * seen (about 150 bytes per channel) and is never freed. */
static _Thread_local void* scratch_block;
static _Thread_local size_t scratch_bytes;

static void* scratch(size_t bytes) {
  if (bytes > scratch_bytes) {
    free(scratch_block);
    scratch_block = malloc(bytes);
    scratch_bytes = scratch_block ? bytes : 0;
  }
  return scratch_block;
}

/* ---------------------------------------------------------------- the state */

/* A sorted position or channel index: channels < 2^24 (positions are exact in
 * a float32 state), and half the memory of int64_t to stream. */
typedef int32_t pos_t;
enum { MAX_CHANNELS = 1 << 24 };

/* The stable sorting order of n values: an LSD radix sort of their bits, mapped
 * to unsigned integers in the values' order (ties keep their indices' order,
 * as torch.sort(stable=True); -0.0 is taken as +0.0, which compares equal).
 * order and spare hold n indices each; keys and spare_keys n keys. */
#define RADIX_BITS 11
#define RADIX_DEFINE(SUFFIX, T, U, SIGN)                                                 \
  static void sort_order_##SUFFIX(int64_t n, const T* values, pos_t* result,              \
                                  pos_t* spare, U* keys, U* spare_keys) {                  \
    pos_t* order = result;                                                                \
    for (int64_t i = 0; i < n; ++i) {                                                     \
      T v = values[i] + (T)0; /* -0.0 + 0.0 is +0.0 */                                    \
      U bits;                                                                             \
      memcpy(&bits, &v, sizeof bits);                                                     \
      keys[i] = (bits & SIGN) ? ~bits : (bits | SIGN);                                    \
      order[i] = (pos_t)i;                                                                \
    }                                                                                     \
    int64_t count[1 << RADIX_BITS];                                                       \
    for (unsigned shift = 0; shift < 8 * sizeof(U); shift += RADIX_BITS) {                \
      memset(count, 0, sizeof count);                                                     \
      for (int64_t i = 0; i < n; ++i) ++count[(keys[i] >> shift) & ((1 << RADIX_BITS) - 1)]; \
      if (count[(keys[0] >> shift) & ((1 << RADIX_BITS) - 1)] == n) continue; /* one digit */ \
      int64_t total = 0;                                                                  \
      for (int d = 0; d < (1 << RADIX_BITS); ++d) {                                       \
        int64_t c = count[d];                                                             \
        count[d] = total;                                                                 \
        total += c;                                                                       \
      }                                                                                   \
      for (int64_t i = 0; i < n; ++i) {                                                   \
        int64_t at = count[(keys[i] >> shift) & ((1 << RADIX_BITS) - 1)]++;               \
        spare_keys[at] = keys[i];                                                         \
        spare[at] = order[i];                                                             \
      }                                                                                   \
      U* k = keys; keys = spare_keys; spare_keys = k;                                     \
      pos_t* o = order; order = spare; spare = o;                                         \
    }                                                                                     \
    /* After an odd number of scatters the order sits in the spare row. */             \
    if (order != result) memcpy(result, order, (size_t)n * sizeof(pos_t));               \
  }

/* The rule |t - v| <= r, in the signatures' dtype as the dense S and the
 * kernels decide it, as three predicates that are false, then true over the
 * sorted u (rounding is monotone and sign-symmetric, and t - v rounds to <= 0
 * exactly when v >= t): the first u >= t (mid); the first u kept or >= t, i.e.
 * t - u <= r (lo); the first u above t and not kept, i.e. u - t > r (hi).
 * Single comparisons, so the searches compile to conditional moves. C
 * evaluates float arithmetic in float on x86-64 and aarch64 (FLT_EVAL_METHOD 0). */
#define AT_OR_ABOVE(v, t, r) ((v) >= (t))
#define KEPT_FROM_LEFT(v, t, r) ((t) - (v) <= (r))
#define DROPPED_ON_RIGHT(v, t, r) ((v) - (t) > (r))

/* Rows searched together, one predicate at a time: independent chains of
 * loads and compares that the CPU overlaps, and no branch to mispredict in a
 * chain. (All three predicates in one loop held 24 positions, more than the
 * registers: the state took 1.6x as long.) */
#define SEARCH_LANES 8

/* For SEARCH_LANES rows: the first sorted position where each predicate holds
 * (n where none does), by branchless binary searches. */
#define SEARCH_DEFINE(SUFFIX, T)                                                       \
  static void search_##SUFFIX(int64_t n, const T* u, const T* t, const T* r,           \
                              int64_t* mid, int64_t* lo, int64_t* hi) {                \
    SEARCH_ONE(T, AT_OR_ABOVE, mid)                                                    \
    SEARCH_ONE(T, KEPT_FROM_LEFT, lo)                                                  \
    SEARCH_ONE(T, DROPPED_ON_RIGHT, hi)                                                \
  }

/* One predicate's searches, into first[0 .. SEARCH_LANES). */
#define SEARCH_ONE(T, HOLDS, first)                                                    \
  {                                                                                    \
    int64_t at[SEARCH_LANES] = {0};                                                    \
    for (int64_t len = n; len > 1;) {                                                  \
      int64_t half = len / 2;                                                          \
      for (int j = 0; j < SEARCH_LANES; ++j)                                           \
        at[j] += HOLDS(u[at[j] + half - 1], t[j], r[j]) ? 0 : half;                    \
      len -= half;                                                                     \
    }                                                                                  \
    for (int j = 0; j < SEARCH_LANES; ++j) first[j] = at[j] + !HOLDS(u[at[j]], t[j], r[j]); \
  }

#define STATE_DEFINE(SUFFIX, T, U, SIGN)                                                \
  RADIX_DEFINE(SUFFIX, T, U, SIGN)                                                      \
  SEARCH_DEFINE(SUFFIX, T)                                                              \
  static int window_state_##SUFFIX(int64_t n, const T* sig, T* state) {                 \
    const T* ys = sig;                                                                  \
    const T* yt = sig + n;                                                              \
    pos_t* order = scratch((size_t)n * (2 * sizeof(pos_t) + 2 * sizeof(U) + sizeof(T)));    \
    if (!order) return -1;                                                              \
    U* keys = (U*)(order + 2 * n);                                                      \
    T* u = (T*)(keys + 2 * n);                                                          \
    sort_order_##SUFFIX(n, ys, order, order + n, keys, keys + n);                       \
    for (int64_t p = 0; p < n; ++p) u[p] = ys[order[p]];                                \
    memmove(state, sig, (size_t)(2 * n) * sizeof(T));                                   \
    /* The diagonal is kept, so lo <= mid <= hi and the window is never empty. */      \
    for (int64_t first = 0; first < n; first += SEARCH_LANES) {                         \
      /* A last, partial group repeats its final row in the spare lanes. */            \
      T t[SEARCH_LANES], r[SEARCH_LANES];                                               \
      int64_t mid[SEARCH_LANES], lo[SEARCH_LANES], hi[SEARCH_LANES];                    \
      for (int j = 0; j < SEARCH_LANES; ++j) {                                          \
        int64_t i = first + j < n ? first + j : n - 1;                                  \
        t[j] = yt[i];                                                                   \
        r[j] = ABS(yt[i] - ys[i]);                                                      \
      }                                                                                 \
      search_##SUFFIX(n, u, t, r, mid, lo, hi);                                         \
      for (int j = 0; j < SEARCH_LANES && first + j < n; ++j) {                         \
        state[ROW_LO * n + first + j] = (T)lo[j];                                       \
        state[ROW_MID * n + first + j] = (T)mid[j];                                     \
        state[ROW_HI * n + first + j] = (T)hi[j];                                       \
      }                                                                                 \
    }                                                                                   \
    for (int64_t p = 0; p < n; ++p) state[ROW_ORDER * n + p] = (T)order[p];             \
    return 0;                                                                           \
  }

#define ABS fabsf
STATE_DEFINE(f32, float, uint32_t, UINT32_C(0x80000000))
#undef ABS
#define ABS fabs
STATE_DEFINE(f64, double, uint64_t, UINT64_C(0x8000000000000000))
#undef ABS

/* ------------------------------------------------------------- the products */

/* exp(x) in place for x <= 0 (-inf included), as one loop the compiler
 * vectorises: a libm exp per value cost as much as the rest of a product.
 * Cody-Waite reduction x = k ln2 + r, |r| <= ln2 / 2, the Taylor polynomial
 * of degree 13 (truncation below 1e-17 relative), 2^k from its exponent bits:
 * within 2 ulp of exp. Zero below -708, where exp would leave the normal
 * range: such terms cannot matter next to a sum's largest, exp(0)-sized, ones. */
static void exp_in_place(double* x, int64_t n) {
  const double log2e = 1.4426950408889634, shifter = 6755399441055744.0; /* 1.5 * 2^52 */
  const double ln2_hi = 6.93147180369123816490e-01, ln2_lo = 1.90821492927058770002e-10;
  uint64_t shifter_bits;
  memcpy(&shifter_bits, &shifter, sizeof shifter_bits);
  for (int64_t i = 0; i < n; ++i) {
    double v = x[i];
    double c = v < -708.0 ? -708.0 : v;
    double t = c * log2e + shifter; /* k + 1.5 * 2^52: k in the low bits */
    double k = t - shifter;
    double r = (c - k * ln2_hi) - k * ln2_lo;
    double p = 1.0 / 6227020800.0;
    p = p * r + 1.0 / 479001600.0;
    p = p * r + 1.0 / 39916800.0;
    p = p * r + 1.0 / 3628800.0;
    p = p * r + 1.0 / 362880.0;
    p = p * r + 1.0 / 40320.0;
    p = p * r + 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    uint64_t bits;
    memcpy(&bits, &t, sizeof bits);
    uint64_t scale_bits = (bits - shifter_bits + 1023) << 52; /* k >= -1022: a normal 2^k */
    double scale;
    memcpy(&scale, &scale_bits, sizeof scale);
    x[i] = v < -708.0 ? 0.0 : p * scale;
  }
}

/* What windows_ and windows_cached_ return for a state whose positions are out of range. */
enum { NOT_A_STATE = -2 };

/* What every product needs of the state, in double and sorted order. */
typedef struct {
  int64_t n;
  pos_t *order, *lo, *mid, *hi;
  double* su;      /* u / T, sorted */
  double* st;      /* y_t / T, channel order */
  /* Row i's weights at its window edges, the softmax's 1 / z'_i (z'_i >= 1)
   * included: exp(su[e-1] - st + d) / z' left of mid (e = mid, lo) and
   * exp(st - su[e] + d) / z' right of it (e = mid, hi); zero where the edge
   * has no term. In the work rows below, or in a state's cache rows. */
  const double *left_mid, *left_lo, *right_mid, *right_hi;
  /* step[p] = exp(su[p-1] - su[p]) <= 1 between neighbours; 0 at p = 0 and p = n,
   * so that the sums' first terms need no case of their own. */
  double* step;
  /* Work rows: the four weights' rows, and for two value rows at a time a
   * prefix and a suffix row of n + 1 (or the sweeps' edge histograms) and a row of n. */
  double* weights;
  double *prefix[2], *suffix[2], *held[2];
} Windows;

/* A state may carry, after its WINDOW_ROWS rows, what the products build from
 * it (the backward then builds nothing): CACHE_DOUBLES rows of C doubles, bit
 * for bit (two float32 rows each in a float32 state): the four weight rows,
 * then step[0 .. C). Written by window_recalibration. */
enum { CACHE_DOUBLES = 5 };

/* The cache's rows in a state of elements of `itemsize` bytes (4 or 8). */
static int64_t cache_rows(size_t itemsize) { return CACHE_DOUBLES * (int64_t)(sizeof(double) / itemsize); }

/* The four weight rows at `weights` (4 n doubles). */
static void weights_at(Windows* w, double* weights) {
  w->weights = weights;
  w->left_mid = weights; w->left_lo = weights + w->n; w->right_mid = weights + 2 * w->n;
  w->right_hi = weights + 3 * w->n;
}

static int windows_alloc(Windows* w, int64_t n) {
  size_t rows = 8 * (size_t)n + 5 * (size_t)(n + 1); /* su, st, 4 weights, 2 held; step, 4 work */
  w->n = n;
  pos_t* ints = scratch(4 * (size_t)n * sizeof(pos_t) + rows * sizeof(double));
  if (!ints) return -1;
  w->order = ints; w->lo = ints + n; w->mid = ints + 2 * n; w->hi = ints + 3 * n;
  double* d = (double*)(ints + 4 * n);
  w->su = d; w->st = d + n;
  weights_at(w, d + 2 * n);
  w->step = d + 6 * n;
  double* work = w->step + n + 1;
  for (int r = 0; r < 2; ++r) {
    w->prefix[r] = work + 2 * r * (n + 1);
    w->suffix[r] = w->prefix[r] + n + 1;
    w->held[r] = work + 4 * (n + 1) + r * n;
  }
  return 0;
}

/* For two rows a and b (b = a for one row; NULL: ones), into w->prefix[r] and
 * w->suffix[r]: prefix[m] = sum_{j<m} v[order[j]] exp(su[j] - su[m-1]) (0 for
 * m = 0) and suffix[m] = sum_{j>=m} v[order[j]] exp(su[m] - su[j]) (0 for m = n).
 * Each is a chain of multiply-adds whose every step waits for the last: the
 * four run in one loop, so that the CPU overlaps them. */
#define SUMS_DEFINE(SUFFIX, T)                                                                     \
  static void sorted_sums_##SUFFIX(const Windows* w, const T* a, const T* b) {                     \
    int64_t n = w->n;                                                                              \
    double *pa = w->prefix[0], *pb = w->prefix[1], *sa = w->suffix[0], *sb = w->suffix[1];          \
    pa[0] = pb[0] = sa[n] = sb[n] = 0.0;                                                           \
    for (int64_t m = 1; m <= n; ++m) {                                                             \
      int64_t j = n - m; /* the suffix's position */                                             \
      int64_t up = w->order[m - 1], down = w->order[j];                                            \
      double step_up = w->step[m - 1], step_down = w->step[j + 1];                                 \
      pa[m] = pa[m - 1] * step_up + (a ? (double)a[up] : 1.0);                                     \
      pb[m] = pb[m - 1] * step_up + (b ? (double)b[up] : 1.0);                                     \
      sa[j] = sa[j + 1] * step_down + (a ? (double)a[down] : 1.0);                                 \
      sb[j] = sb[j + 1] * step_down + (b ? (double)b[down] : 1.0);                                 \
    }                                                                                              \
  }

#define WINDOWS_DEFINE(SUFFIX, T)                                                                  \
  SUMS_DEFINE(SUFFIX, T)                                                                           \
  /* The work memory, and the order and window edges of the state as integers:                   \
   * -1 without memory, NOT_A_STATE when a position is out of range (every later                   \
   * index is one of these, so a state of other origin cannot make the products                     \
   * read or write outside their rows). */                                                          \
  static int windows_edges_##SUFFIX(Windows* w, int64_t n, const T* state) {                       \
    if (windows_alloc(w, n)) return -1;                                                            \
    for (int64_t i = 0; i < n; ++i) {                                                              \
      T order = state[ROW_ORDER * n + i], lo = state[ROW_LO * n + i];                              \
      T mid = state[ROW_MID * n + i], hi = state[ROW_HI * n + i];                                  \
      if (!(order >= 0 && order < (T)n && lo >= 0 && lo <= mid && mid <= hi && hi <= (T)n))       \
        return NOT_A_STATE;                                                                        \
      w->order[i] = (pos_t)order;                                                                  \
      w->lo[i] = (pos_t)lo;                                                                        \
      w->mid[i] = (pos_t)mid;                                                                      \
      w->hi[i] = (pos_t)hi;                                                                        \
    }                                                                                              \
    return 0;                                                                                      \
  }                                                                                                \
                                                                                                   \
  /* weights: where the four weight rows go (NULL: the work memory). */                            \
  static int windows_##SUFFIX(Windows* w, int64_t n, const T* state, double temperature,          \
                              double* weights) {                                                   \
    int edges = windows_edges_##SUFFIX(w, n, state);                                               \
    if (edges) return edges;                                                                       \
    if (weights) weights_at(w, weights);                                                           \
    for (int64_t i = 0; i < n; ++i) w->st[i] = (double)state[ROW_TARGET * n + i] / temperature;    \
    for (int64_t p = 0; p < n; ++p)                                                                \
      w->su[p] = (double)state[ROW_SOURCE * n + w->order[p]] / temperature;                        \
    w->step[0] = w->step[n] = 0.0;                                                                 \
    for (int64_t p = 1; p < n; ++p) w->step[p] = w->su[p - 1] - w->su[p];                          \
    exp_in_place(w->step + 1, n - 1);                                                              \
    /* The unit sums: the softmax denominators' two halves. */                                    \
    sorted_sums_##SUFFIX(w, NULL, NULL);                                                           \
    /* The edge factors' exponents first, then their exponentials in one pass over                 \
     * the three consecutive rows left_lo, right_mid, right_hi. Of left_mid and                     \
     * right_mid one is exp(0); the other, exp(-|below - above|), is taken in                       \
     * right_mid's row and moved where it belongs after. */                                         \
    double *left_mid = w->weights, *left_lo = left_mid + n, *right_mid = left_lo + n;               \
    double* right_hi = right_mid + n;                                                              \
    for (int64_t i = 0; i < n; ++i) {                                                              \
      int64_t mid = w->mid[i], lo = w->lo[i], hi = w->hi[i];                                       \
      double t = w->st[i];                                                                         \
      double below = mid > 0 ? t - w->su[mid - 1] : INFINITY;                                      \
      double above = mid < n ? w->su[mid] - t : INFINITY;                                          \
      double near = below < above ? below : above; /* d_i */                                       \
      right_mid[i] = -fabs(below - above); /* -inf past an end */                                 \
      left_lo[i] = lo > 0 ? w->su[lo - 1] - t + near : -INFINITY;                                 \
      right_hi[i] = hi < n ? t - w->su[hi] + near : -INFINITY;                                     \
    }                                                                                              \
    exp_in_place(left_lo, 3 * n);                                                                  \
    for (int64_t i = 0; i < n; ++i) {                                                              \
      int64_t mid = w->mid[i];                                                                     \
      double t = w->st[i];                                                                         \
      int left_nearer = mid == n || (mid > 0 && t - w->su[mid - 1] <= w->su[mid] - t);             \
      double other = right_mid[i];                                                                 \
      left_mid[i] = left_nearer ? 1.0 : other;                                                     \
      right_mid[i] = left_nearer ? other : 1.0;                                                    \
      double inv_z = 1.0 / (w->prefix[0][mid] * left_mid[i] + w->suffix[0][mid] * right_mid[i]);   \
      left_mid[i] *= inv_z;                                                                        \
      left_lo[i] *= inv_z;                                                                         \
      right_mid[i] *= inv_z;                                                                       \
      right_hi[i] *= inv_z;                                                                        \
    }                                                                                              \
    return 0;                                                                                      \
  }                                                                                                \
                                                                                                   \
  /* The same from a state that carries the cache (CACHE_DOUBLES): no exponential. */             \
  static int windows_cached_##SUFFIX(Windows* w, int64_t n, const T* state) {                      \
    int edges = windows_edges_##SUFFIX(w, n, state);                                               \
    if (edges) return edges;                                                                       \
    const double* cache = (const double*)(state + WINDOW_ROWS * n);                                \
    w->left_mid = cache; w->left_lo = cache + n; w->right_mid = cache + 2 * n;                     \
    w->right_hi = cache + 3 * n;                                                                   \
    memcpy(w->step, cache + 4 * n, (size_t)n * sizeof(double));                                    \
    w->step[n] = 0.0;                                                                              \
    return 0;                                                                                      \
  }                                                                                                \
                                                                                                   \
  /* out[r] = (I + S) values[r] for each of the k rows, two at a time (out[r] may be values[r]). */\
  static void times_##SUFFIX(const Windows* w, int64_t k, T* const* values, T* const* out) {      \
    int64_t n = w->n;                                                                              \
    for (int64_t row = 0; row < k; row += 2) {                                                     \
      int64_t rows = k - row < 2 ? 1 : 2;                                                          \
      sorted_sums_##SUFFIX(w, values[row], values[row + rows - 1]);                                \
      for (int64_t r = 0; r < rows; ++r) {                                                         \
        const T* v = values[row + r];                                                              \
        T* dst = out[row + r];                                                                     \
        const double *prefix = w->prefix[r], *suffix = w->suffix[r];                               \
        for (int64_t i = 0; i < n; ++i) {                                                          \
          double kept = prefix[w->mid[i]] * w->left_mid[i] - prefix[w->lo[i]] * w->left_lo[i]     \
                        + suffix[w->mid[i]] * w->right_mid[i] - suffix[w->hi[i]] * w->right_hi[i]; \
          dst[i] = (T)((double)v[i] + kept);                                                       \
        }                                                                                          \
      }                                                                                            \
    }                                                                                              \
  }                                                                                                \
                                                                                                   \
  /* out[r] = (I + S)^T grads[r] for each of the k rows g (out[r] may be grads[r]).               \
   * For the channel at sorted position p, the rows whose window holds p on                        \
   * their left (lo <= p < mid) and on their right (mid <= p < hi), gathered by one sweep over p each way, \
   * the rows entering and leaving at their window edges (histograms over the                      \
   * edges, each row's term at the edge where it enters or leaves). Two rows at                    \
   * a time, both sweeps in one loop: four independent chains. */                                  \
  static void times_transposed_##SUFFIX(const Windows* w, int64_t k, T* const* grads,             \
                                        T* const* out) {                                           \
    int64_t n = w->n;                                                                              \
    for (int64_t row = 0; row < k; row += 2) {                                                     \
      int64_t rows = k - row < 2 ? 1 : 2;                                                          \
      for (int64_t r = 0; r < rows; ++r) {                                                         \
        const T* g = grads[row + r];                                                               \
        double *left = w->prefix[r], *right = w->suffix[r];                                        \
        memset(left, 0, (size_t)(n + 1) * sizeof(double));                                         \
        memset(right, 0, (size_t)(n + 1) * sizeof(double));                                        \
        for (int64_t i = 0; i < n; ++i) {                                                          \
          double a = (double)g[i];                                                                 \
          /* Left: held for p in [lo, mid), swept downwards (enters at p = mid - 1). */           \
          left[w->mid[i]] += a * w->left_mid[i];                                                   \
          left[w->lo[i]] -= a * w->left_lo[i];                                                     \
          /* Right: held for p in [mid, hi), swept upwards (enters at p = mid). */                \
          right[w->mid[i]] += a * w->right_mid[i];                                                 \
          right[w->hi[i]] -= a * w->right_hi[i];                                                   \
        }                                                                                          \
      }                                                                                            \
      if (rows == 1) { /* a second, empty row keeps the loop below one shape */                   \
        memset(w->prefix[1], 0, (size_t)(n + 1) * sizeof(double));                                 \
        memset(w->suffix[1], 0, (size_t)(n + 1) * sizeof(double));                                 \
      }                                                                                            \
      double *la = w->prefix[0], *lb = w->prefix[1], *ra = w->suffix[0], *rb = w->suffix[1];       \
      double *ha = w->held[0], *hb = w->held[1];                                                   \
      double down_a = 0.0, down_b = 0.0, up_a = 0.0, up_b = 0.0;                                   \
      for (int64_t m = 0; m < n; ++m) {                                                            \
        int64_t p = n - 1 - m; /* downwards */                                                   \
        down_a = down_a * w->step[p + 1] + la[p + 1];                                              \
        down_b = down_b * w->step[p + 1] + lb[p + 1];                                              \
        /* Each position is reached by both sweeps: the first assigns, the second adds             \
         * (the up sweep passed p already when p < m; at p == m the down sweep is first). */       \
        ha[p] = p < m ? ha[p] + down_a : down_a;                                                   \
        hb[p] = p < m ? hb[p] + down_b : down_b;                                                   \
        up_a = up_a * w->step[m] + ra[m];                                                          \
        up_b = up_b * w->step[m] + rb[m];                                                          \
        ha[m] = m >= p ? ha[m] + up_a : up_a;                                                      \
        hb[m] = m >= p ? hb[m] + up_b : up_b;                                                      \
      }                                                                                            \
      for (int64_t r = 0; r < rows; ++r) {                                                         \
        const T* g = grads[row + r];                                                               \
        for (int64_t q = 0; q < n; ++q) {                                                          \
          int64_t c = w->order[q];                                                                 \
          out[row + r][c] = (T)((double)g[c] + w->held[r][q]);                                     \
        }                                                                                          \
      }                                                                                            \
    }                                                                                              \
  }

WINDOWS_DEFINE(f32, float)
WINDOWS_DEFINE(f64, double)

/* The torch backend's forward C x C step in one call: from the affine rows
 * gamma_s, beta_s, gamma_t, beta_t (rows[0 .. 4)), the signatures
 * beta / (|gamma| + eps) (rounded as PyTorch rounds them: T arithmetic), the
 * window state, its cache for the backward, and the effective affine
 * (I + S) [gamma_t, beta_t] as two more rows of out. Rows holding NaN or an
 * infinity come first: their bits (1 << row) are returned and nothing is
 * written; -1 without memory; else 0. */
#define RECALIBRATION_DEFINE(SUFFIX, T, U, EXPONENT, ABS)                                        \
  static int recalibration_##SUFFIX(int64_t n, T* const* rows, double eps, double temperature,    \
                                    T* out) {                                                     \
    int non_finite = 0;                                                                           \
    for (int r = 0; r < 4; ++r) {                                                                 \
      U found = 0; /* NaN and the infinities: every exponent bit set */                          \
      for (int64_t i = 0; i < n; ++i) {                                                           \
        U bits;                                                                                   \
        memcpy(&bits, rows[r] + i, sizeof bits);                                                  \
        found |= (U)((bits & (EXPONENT)) == (EXPONENT));                                          \
      }                                                                                           \
      if (found) non_finite |= 1 << r;                                                            \
    }                                                                                             \
    if (non_finite) return non_finite;                                                            \
    T e = (T)eps;                                                                                 \
    for (int64_t i = 0; i < n; ++i) {                                                             \
      out[ROW_SOURCE * n + i] = rows[1][i] / (ABS(rows[0][i]) + e);                               \
      out[ROW_TARGET * n + i] = rows[3][i] / (ABS(rows[2][i]) + e);                               \
    }                                                                                             \
    Windows w;                                                                                    \
    double* cache = (double*)(out + WINDOW_ROWS * n); /* the weights go straight there */        \
    if (window_state_##SUFFIX(n, out, out) || windows_##SUFFIX(&w, n, out, temperature, cache))   \
      return -1;                                                                                  \
    memcpy(cache + 4 * n, w.step, (size_t)n * sizeof(double));                                    \
    T* affine = out + (WINDOW_ROWS + cache_rows(sizeof(T))) * n;                                  \
    T* effective[2] = {affine, affine + n};                                                       \
    times_##SUFFIX(&w, 2, rows + 2, effective);                                                   \
    return 0;                                                                                     \
  }

RECALIBRATION_DEFINE(f32, float, uint32_t, UINT32_C(0x7f800000), fabsf)
RECALIBRATION_DEFINE(f64, double, uint64_t, UINT64_C(0x7ff0000000000000), fabs)

/* ---------------------------------------------------------------- bindings */

static void* address(PyObject* value) {
  void* p = PyLong_AsVoidPtr(value);
  if (p == NULL && !PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "acnorm_fused._cpu: null address");
  return p;
}

static int check_args(const char* name, Py_ssize_t given, Py_ssize_t wanted) {
  if (given == wanted) return 0;
  PyErr_Format(PyExc_TypeError, "acnorm_fused._cpu.%s takes %zd arguments (%zd given)", name, wanted, given);
  return -1;
}

static int channels(PyObject* value, int64_t* n) {
  long long c = PyLong_AsLongLong(value);
  if (c == -1 && PyErr_Occurred()) return -1;
  if (c < 1 || c > MAX_CHANNELS) {
    PyErr_Format(PyExc_ValueError, c < 1 ? "acnorm_fused._cpu: need at least one channel, got %lld"
                                         : "acnorm_fused._cpu: at most 2^24 channels, got %lld", c);
    return -1;
  }
  *n = (int64_t)c;
  return 0;
}

/* The arguments every entry point starts with: channels, double, and (unless
 * first is NULL) an address. */
static int leading_args(const char* name, PyObject* const* args, Py_ssize_t nargs, Py_ssize_t wanted,
                        int64_t* n, int* is_double, void** first) {
  if (check_args(name, nargs, wanted) || channels(args[0], n)) return -1;
  *is_double = PyObject_IsTrue(args[1]);
  if (*is_double < 0) return -1;
  if (!first) return 0;
  *first = address(args[2]);
  return *first ? 0 : -1;
}

/* The addresses of k rows of `row_bytes` bytes each into rows[0 .. k): `value` is
 * the address of the first of k contiguous rows, or a tuple of k addresses. */
static int row_addresses(PyObject* value, Py_ssize_t k, size_t row_bytes, void** rows) {
  if (PyTuple_Check(value)) {
    if (PyTuple_GET_SIZE(value) != k) {
      PyErr_Format(PyExc_ValueError, "acnorm_fused._cpu: %zd row addresses for %zd rows",
                   PyTuple_GET_SIZE(value), k);
      return -1;
    }
    for (Py_ssize_t r = 0; r < k; ++r)
      if (!(rows[r] = address(PyTuple_GET_ITEM(value, r)))) return -1;
    return 0;
  }
  char* first = address(value);
  if (!first) return -1;
  for (Py_ssize_t r = 0; r < k; ++r) rows[r] = first + (size_t)r * row_bytes;
  return 0;
}

PyDoc_STRVAR(window_state_doc,
             "window_state(channels, double, signatures, state)\n\n"
             "Writes the (6, C) window state of the (2, C) signature rows [y_s, y_t] at address\n"
             "`signatures` to address `state`: those rows, the order that sorts y_s (stable) and\n"
             "each row's window edges lo, mid, hi, in float64 when `double`, else float32.");

static PyObject* py_window_state(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  (void)self;
  int64_t n;
  int is_double;
  void* sig;
  if (leading_args("window_state", args, nargs, 4, &n, &is_double, &sig)) return NULL;
  void* state = address(args[3]);
  if (!state) return NULL;
  int status;
  Py_BEGIN_ALLOW_THREADS
  status = is_double ? window_state_f64(n, sig, state) : window_state_f32(n, sig, state);
  Py_END_ALLOW_THREADS
  if (status) return PyErr_NoMemory();
  Py_RETURN_NONE;
}

PyDoc_STRVAR(window_product_doc,
             "window_product(channels, double, state, state_rows, temperature, rows, values, out, transposed)\n\n"
             "Writes (I + S) v, or (I + S)^T g when `transposed`, for each of the `rows` rows v\n"
             "of `values` to the rows of `out`, S given by the window state at address `state`\n"
             "(`state_rows` rows: 6, or with its cache from window_recalibration). `values` and\n"
             "`out` are each the address of `rows` contiguous rows of C or a tuple of `rows` row\n"
             "addresses; out may be values (each row is read before it is written). Every\n"
             "tensor float64 when `double`, else float32.");

static PyObject* py_window_product(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  (void)self;
  int64_t n;
  int is_double;
  void* state;
  if (leading_args("window_product", args, nargs, 9, &n, &is_double, &state)) return NULL;
  long long state_rows = PyLong_AsLongLong(args[3]);
  if (state_rows == -1 && PyErr_Occurred()) return NULL;
  int64_t with_cache = WINDOW_ROWS + cache_rows(is_double ? sizeof(double) : sizeof(float));
  int cached = state_rows == with_cache;
  if (state_rows != WINDOW_ROWS && !cached) {
    PyErr_Format(PyExc_ValueError, "acnorm_fused._cpu: a window state has %d rows, or %d with its cache; got %lld",
                 WINDOW_ROWS, (int)with_cache, state_rows);
    return NULL;
  }
  double temperature = PyFloat_AsDouble(args[4]);
  if (temperature == -1.0 && PyErr_Occurred()) return NULL;
  if (!(temperature > 0.0)) {
    PyErr_SetString(PyExc_ValueError, "acnorm_fused._cpu: temperature must be positive");
    return NULL;
  }
  long long k = PyLong_AsLongLong(args[5]);
  if (k == -1 && PyErr_Occurred()) return NULL;
  if (k < 0 || k > INT32_MAX) {
    PyErr_SetString(PyExc_ValueError, k < 0 ? "acnorm_fused._cpu: rows must be >= 0"
                                            : "acnorm_fused._cpu: rows must be < 2^31");
    return NULL;
  }
  int transposed = PyObject_IsTrue(args[8]);
  if (transposed < 0) return NULL;
  void** values = PyMem_Malloc((size_t)(2 * k + 1) * sizeof(void*)); /* + 1: k may be 0 */
  if (!values) return PyErr_NoMemory();
  void** out = values + k;
  size_t row_bytes = (size_t)n * (is_double ? sizeof(double) : sizeof(float));
  if (row_addresses(args[6], (Py_ssize_t)k, row_bytes, values) ||
      row_addresses(args[7], (Py_ssize_t)k, row_bytes, out)) {
    PyMem_Free(values);
    return NULL;
  }
  int status;
  Py_BEGIN_ALLOW_THREADS
  Windows w;
  if (is_double) {
    status = cached ? windows_cached_f64(&w, n, state) : windows_f64(&w, n, state, temperature, NULL);
    if (!status) {
      if (transposed) times_transposed_f64(&w, k, (double**)values, (double**)out);
      else times_f64(&w, k, (double**)values, (double**)out);
    }
  } else {
    status = cached ? windows_cached_f32(&w, n, state) : windows_f32(&w, n, state, temperature, NULL);
    if (!status) {
      if (transposed) times_transposed_f32(&w, k, (float**)values, (float**)out);
      else times_f32(&w, k, (float**)values, (float**)out);
    }
  }
  Py_END_ALLOW_THREADS
  PyMem_Free(values);
  if (status == NOT_A_STATE) {
    PyErr_SetString(PyExc_ValueError, "acnorm_fused._cpu: not a window state (its sort order or window edges "
                                      "are out of range)");
    return NULL;
  }
  if (status) return PyErr_NoMemory();
  Py_RETURN_NONE;
}

PyDoc_STRVAR(window_recalibration_doc,
             "window_recalibration(channels, double, affines, eps, temperature, out) -> int\n\n"
             "Writes to address `out` the window state of the affine rows gamma_s, beta_s,\n"
             "gamma_t, beta_t (`affines`: the address of the (4, C) rows or a tuple of 4 row\n"
             "addresses; signatures with `eps`) with its cache (16 rows in all in float32, 11 in\n"
             "float64) and the effective affine (I + S) [gamma_t, beta_t] as two more rows, in\n"
             "float64 when `double`, else float32. Returns 0, or, when rows hold NaN or an\n"
             "infinity, their bits (1 << row) having written nothing.");

static PyObject* py_window_recalibration(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  (void)self;
  int64_t n;
  int is_double;
  void* affines[4];
  if (leading_args("window_recalibration", args, nargs, 6, &n, &is_double, NULL) ||
      row_addresses(args[2], 4, (size_t)n * (is_double ? sizeof(double) : sizeof(float)), affines))
    return NULL;
  double eps = PyFloat_AsDouble(args[3]);
  if (eps == -1.0 && PyErr_Occurred()) return NULL;
  double temperature = PyFloat_AsDouble(args[4]);
  if (temperature == -1.0 && PyErr_Occurred()) return NULL;
  if (!(eps >= 0.0) || !(temperature > 0.0)) {
    PyErr_SetString(PyExc_ValueError, "acnorm_fused._cpu: eps must be >= 0 and temperature positive");
    return NULL;
  }
  void* out = address(args[5]);
  if (!out) return NULL;
  int status;
  Py_BEGIN_ALLOW_THREADS
  status = is_double ? recalibration_f64(n, (double**)affines, eps, temperature, out)
                     : recalibration_f32(n, (float**)affines, eps, temperature, out);
  Py_END_ALLOW_THREADS
  if (status < 0) return PyErr_NoMemory();
  return PyLong_FromLong(status);
}

static PyMethodDef methods[] = {
    {"window_recalibration", (PyCFunction)(void (*)(void))py_window_recalibration, METH_FASTCALL,
     window_recalibration_doc},
    {"window_state", (PyCFunction)(void (*)(void))py_window_state, METH_FASTCALL, window_state_doc},
    {"window_product", (PyCFunction)(void (*)(void))py_window_product, METH_FASTCALL, window_product_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "acnorm_fused._cpu",
    "The C x C step of wide AC-Norm layers on the CPU, compiled (see acnorm_fused.correlation).",
    -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__cpu(void) {
  PyObject* m = PyModule_Create(&module);
  if (m && (PyModule_AddIntConstant(m, "WINDOW_ROWS", WINDOW_ROWS) ||
            PyModule_AddIntConstant(m, "CACHE_DOUBLES", CACHE_DOUBLES))) {
    Py_DECREF(m);
    return NULL;
  }
  return m;
}

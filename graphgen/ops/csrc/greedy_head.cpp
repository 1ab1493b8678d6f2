// graphgen::greedy_head (graphgen/ops/greedy_head.py): tokens[r] = argmax_n x[r] . w[n] for an fp32 LM
// head, ties to the lowest id, without computing every logit exactly.
//
// A greedy step needs only each row's argmax, yet the LM head is the step's largest matrix (bench-125m:
// 32000 x 768, 98 MB). Here a bf16 copy of w (`packed`, made once by the runtime) and x rounded to bf16
// give approximate logits a[n] through AVX512-BF16 dot products: half the bytes and twice the products
// per cycle of fp32 FMAs (Zen 4: 32 against 16 a cycle). Each a[n] is within B[n] of the exact logit
// e[n] (below), so only ids whose interval [a - B, a + B] reaches the best lower bound max_m (a[m] -
// B[m]) can be the argmax; those few (bench-125m: ~2-6 a row) are computed exactly in fp32 and the
// largest wins. The argmax of e is always among them: e[n*] >= e[m] >= a[m] - B[m] for every m.
//
// The bound, with u = 2^-8 (bf16's unit roundoff) and gamma = (K + 2) 2^-24 (an fp32 sum of K terms):
//   |a[n] - e[n]| <= (2u + u^2 + 2.2 gamma) sum_k |x_k w_nk| + (denormals, which the dot product reads as 0)
//                <= c ||x|| ||w_n|| + 2^-126 sqrt(K) (||x|| + ||w_n||)      (Cauchy-Schwarz)
// with c inflated by 1% to cover the fp32 rounding of the bound arithmetic itself. Rows of x that are
// not finite, or whose bounds overflow, run every logit exactly (NaN wins, as in torch's argmax).
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "kernels.h"

using namespace graphgen;

namespace {

constexpr int64_t kTile = 16;        // vocab rows per packed tile: one zmm of fp32 sums
constexpr int64_t kBlockTiles = 3;   // tiles a microkernel call runs: 3 x 8 rows of x = 24 accumulators
constexpr int64_t kBlock = kTile * kBlockTiles;
constexpr int kRowsPerPass = 8;

bool has_bf16_dot() {
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
  static const bool yes = __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512f");
  return yes;
#else
  return false;
#endif
}

inline uint32_t bf16_bits(float f) {  // round to nearest even (finite f)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
}

#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#define GRAPHGEN_BF16_DOT 1
// Approximate logits of RB rows of x (bf16 pairs, xp[r * K2 + kk]) against the kBlockTiles tiles at
// `tiles` (each K2 x 16 x 2 bf16), into a[r * ldA + 16 t + i]; lo[r] = max(lo[r], a - bound) over the
// block's first `valid` vocab rows.
template <int RB>
__attribute__((target("avx512f,avx512bf16"))) void approx_block(const uint32_t* xp, const uint16_t* tiles,
                                                                 int64_t K2, float* a, int64_t ldA, const float* cx,
                                                                 const float* norms, int64_t valid, float* lo) {
  __m512 acc[RB][kBlockTiles];
  for (int r = 0; r < RB; ++r)
    for (int t = 0; t < kBlockTiles; ++t) acc[r][t] = _mm512_setzero_ps();
  for (int64_t kk = 0; kk < K2; ++kk) {
    __m512bh wv[kBlockTiles];
    for (int t = 0; t < kBlockTiles; ++t)
      wv[t] = (__m512bh)_mm512_load_si512(tiles + (t * K2 + kk) * kTile * 2);
    for (int r = 0; r < RB; ++r) {
      const __m512bh xv = (__m512bh)_mm512_set1_epi32(static_cast<int>(xp[r * K2 + kk]));
      for (int t = 0; t < kBlockTiles; ++t) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], wv[t], xv);
    }
  }
  for (int t = 0; t < kBlockTiles; ++t) {
    const int64_t n0 = t * kTile;
    const __mmask16 live = n0 >= valid ? 0 : (valid - n0 >= kTile ? 0xFFFF : (1u << (valid - n0)) - 1);
    const __m512 nv = _mm512_loadu_ps(norms + n0);
    for (int r = 0; r < RB; ++r) {
      _mm512_storeu_ps(a + r * ldA + n0, acc[r][t]);
      const __m512 low = _mm512_sub_ps(acc[r][t], _mm512_mul_ps(_mm512_set1_ps(cx[r]), nv));
      if (live) lo[r] = std::max(lo[r], _mm512_mask_reduce_max_ps(live, low));
    }
  }
}

void approx_rows(int rb, const uint32_t* xp, const uint16_t* tiles, int64_t K2, float* a, int64_t ldA,
                 const float* cx, const float* norms, int64_t valid, float* lo) {
  switch (rb) {
    case 8: return approx_block<8>(xp, tiles, K2, a, ldA, cx, norms, valid, lo);
    case 7: return approx_block<7>(xp, tiles, K2, a, ldA, cx, norms, valid, lo);
    case 6: return approx_block<6>(xp, tiles, K2, a, ldA, cx, norms, valid, lo);
    case 5: return approx_block<5>(xp, tiles, K2, a, ldA, cx, norms, valid, lo);
    case 4: return approx_block<4>(xp, tiles, K2, a, ldA, cx, norms, valid, lo);
    case 3: return approx_block<3>(xp, tiles, K2, a, ldA, cx, norms, valid, lo);
    case 2: return approx_block<2>(xp, tiles, K2, a, ldA, cx, norms, valid, lo);
    default: return approx_block<1>(xp, tiles, K2, a, ldA, cx, norms, valid, lo);
  }
}
#endif

// x . w in fp32 (8 lanes, then their sum, then the tail).
inline float exact_dot(const float* x, const float* w, int64_t K) {
  __m256 acc = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), _mm256_loadu_ps(w + k), acc);
  float s = hsum(acc);
  for (; k < K; ++k) s += x[k] * w[k];
  return s;
}

// The better of two (value, id) candidates for an argmax: NaN first, then the larger, then the lower id.
struct Best {
  float value = 0.f;
  int64_t id = -1;
  void offer(float v, int64_t n) {
    if (id < 0 || better(v, n, value, id)) value = v, id = n;
  }
  void offer(const Best& o) {
    if (o.id >= 0) offer(o.value, o.id);
  }
  static bool better(float v, int64_t n, float bv, int64_t bn) {
    const bool vn = std::isnan(v), bnan = std::isnan(bv);
    if (vn || bnan) return vn && (!bnan || n < bn);
    return v > bv || (v == bv && n < bn);
  }
};

struct Shapes {
  int64_t R, K, V, tiles, K2;
};

AOTITorchError check(AtenTensorHandle x, AtenTensorHandle w, AtenTensorHandle packed, AtenTensorHandle norms,
                     Shapes& s) {
  const AtenTensorHandle t[4] = {x, w, packed, norms};
  int64_t dims[4], *sizes[4], *strides[4];
  int32_t dtypes[4];
  if (AOTITorchError err = read_args(t, 4, dims, sizes, strides, dtypes)) return err;
  const int32_t f32 = aoti_torch_dtype_float32();
  if (dims[0] != 2 || dims[1] != 2 || dtypes[0] != f32 || dtypes[1] != f32 || sizes[0][1] != sizes[1][1])
    return fail("greedy_head: x (R, K) and weight (V, K), both float32, expected");
  s = {sizes[0][0], sizes[0][1], sizes[1][0], 0, (sizes[0][1] + 1) / 2};
  if (dims[2] != 4 || dtypes[2] != aoti_torch_dtype_bfloat16() || sizes[2][1] != s.K2 || sizes[2][2] != kTile ||
      sizes[2][3] != 2 || sizes[2][0] % kBlockTiles || sizes[2][0] * kTile < s.V)
    return fail("greedy_head: packed must be (tiles, %lld, 16, 2) bfloat16 with tiles a multiple of %lld covering "
                "%lld rows (ops/greedy_head.py: pack_head)", static_cast<long long>(s.K2),
                static_cast<long long>(kBlockTiles), static_cast<long long>(s.V));
  s.tiles = sizes[2][0];
  if (dims[3] != 1 || dtypes[3] != f32 || sizes[3][0] != s.tiles * kTile)
    return fail("greedy_head: norms must be (%lld,) float32", static_cast<long long>(s.tiles * kTile));
  for (int i = 0; i < 4; ++i)
    if (!contiguous(dims[i], sizes[i], strides[i])) return fail("greedy_head: contiguous tensors expected");
  return AOTI_TORCH_SUCCESS;
}

// Every logit of row x exactly; its argmax as torch's argmax takes it.
int64_t exact_argmax(const float* x, const float* w, int64_t V, int64_t K) {
  std::vector<Best> best(threads());
#pragma omp parallel num_threads(threads())
  {
    Best mine;
#pragma omp for schedule(static)
    for (int64_t n = 0; n < V; ++n) mine.offer(exact_dot(x, w + n * K, K), n);
    best[omp_get_thread_num()] = mine;
  }
  Best all;
  for (const Best& b : best) all.offer(b);
  return all.id;
}

AOTITorchError greedy_head(AtenTensorHandle xh, AtenTensorHandle wh, AtenTensorHandle ph, AtenTensorHandle nh,
                           AtenTensorHandle* out) {
  g_last_error.clear();
  *out = nullptr;
#ifndef GRAPHGEN_BF16_DOT
  return fail("greedy_head: built without AVX512-BF16 support (needs GCC 11 or later)");
#else
  if (!has_bf16_dot()) return fail("greedy_head: this CPU has no AVX512-BF16 dot products");
  Shapes s;
  if (AOTITorchError err = check(xh, wh, ph, nh, s)) return err;
  void *xv = nullptr, *wv = nullptr, *pv = nullptr, *nv = nullptr, *tv = nullptr;
  AOTITorchError err = AOTI_TORCH_SUCCESS;
  if ((err = aoti_torch_get_data_ptr(xh, &xv)) || (err = aoti_torch_get_data_ptr(wh, &wv)) ||
      (err = aoti_torch_get_data_ptr(ph, &pv)) || (err = aoti_torch_get_data_ptr(nh, &nv)))
    return err;
  const int64_t size = s.R, stride = 1;
  if ((err = aoti_torch_empty_strided(1, &size, &stride, aoti_torch_dtype_int64(), aoti_torch_device_type_cpu(), 0,
                                      out)) ||
      (err = aoti_torch_get_data_ptr(*out, &tv)))
    return err;
  const float* x = static_cast<const float*>(xv);
  const float* w = static_cast<const float*>(wv);
  const uint16_t* packed = static_cast<const uint16_t*>(pv);
  const float* norms = static_cast<const float*>(nv);
  int64_t* tokens = static_cast<int64_t*>(tv);
  const int64_t R = s.R, K = s.K, K2 = s.K2, V = s.V, Vp = s.tiles * kTile, blocks = s.tiles / kBlockTiles;

  // x as bf16 pairs, its norms, and the rows that need the exact path
  std::vector<uint32_t> xp(R * K2);
  std::vector<float> cx(R), dx(R);
  std::vector<char> exact(R, 0);
  const double c = (1.0 / 128 + 1.0 / 65536 + 2.2 * (K + 2) / 16777216.0) * 1.01;
  const double tiny = std::ldexp(1.0, -126) * std::sqrt(static_cast<double>(K)) * 1.01;
  for (int64_t r = 0; r < R; ++r) {
    const float* xr = x + r * K;
    double sq = 0;
    bool finite = true;
    for (int64_t kk = 0; kk < K2; ++kk) {
      const float lo = xr[2 * kk], hi = 2 * kk + 1 < K ? xr[2 * kk + 1] : 0.f;
      finite = finite && std::isfinite(lo) && std::isfinite(hi);
      sq += static_cast<double>(lo) * lo + static_cast<double>(hi) * hi;
      xp[r * K2 + kk] = finite ? bf16_bits(lo) | bf16_bits(hi) << 16 : 0;
    }
    const double norm = std::sqrt(sq) * (1 + 1e-6);
    // B[n] = cx ||w_n|| + dx: the bound's terms in ||w_n|| and the rest
    const double cxr = c * norm + tiny, dxr = tiny * norm;
    exact[r] = !finite || !std::isfinite(static_cast<float>(cxr)) || !std::isfinite(static_cast<float>(dxr));
    cx[r] = static_cast<float>(cxr) * (1 + 1e-6f);
    dx[r] = static_cast<float>(dxr) * (1 + 1e-6f);
  }

  // approximate logits, and per thread and row the best lower bound max (a - cx ||w||)
  thread_local std::vector<float> scratch;
  if (scratch.size() < static_cast<size_t>(R * Vp)) scratch.resize(R * Vp);
  float* a = scratch.data();
  const int nt = threads();
  std::vector<float> lows(nt * R, -std::numeric_limits<float>::infinity());
#pragma omp parallel num_threads(nt)
  {
    float* lo = lows.data() + omp_get_thread_num() * R;
#pragma omp for schedule(static)
    for (int64_t b = 0; b < blocks; ++b)
      for (int64_t r0 = 0; r0 < R; r0 += kRowsPerPass)
        approx_rows(static_cast<int>(std::min<int64_t>(kRowsPerPass, R - r0)), xp.data() + r0 * K2,
                    packed + b * kBlockTiles * K2 * kTile * 2, K2, a + r0 * Vp + b * kBlock, Vp, cx.data() + r0,
                    norms + b * kBlock, V - b * kBlock, lo + r0);
  }
  std::vector<float> threshold(R);
  for (int64_t r = 0; r < R; ++r) {
    float t = -std::numeric_limits<float>::infinity();
    for (int i = 0; i < nt; ++i) t = std::max(t, lows[i * R + r]);
    threshold[r] = t - 2 * dx[r];  // a[n] + B[n] >= max(a[m] - B[m]) <=> a[n] + cx ||w_n|| >= that - 2 dx
    exact[r] = exact[r] || !std::isfinite(threshold[r]);
  }

  // the candidates, exactly: each thread scans its range of ids for every row
  std::vector<Best> best(nt * R);
#pragma omp parallel num_threads(nt)
  {
    const int t = omp_get_thread_num();
    const int64_t n0 = V * t / nt, n1 = V * (t + 1) / nt;
    for (int64_t r = 0; r < R; ++r) {
      if (exact[r]) continue;
      const float* ar = a + r * Vp;
      const float cr = cx[r], tr = threshold[r];
      Best& mine = best[t * R + r];
      for (int64_t n = n0; n < n1; ++n)
        if (ar[n] + cr * norms[n] >= tr) mine.offer(exact_dot(x + r * K, w + n * K, K), n);
    }
  }
  for (int64_t r = 0; r < R; ++r) {
    if (exact[r]) {
      tokens[r] = exact_argmax(x + r * K, w, V, K);
      continue;
    }
    Best all;
    for (int i = 0; i < nt; ++i) all.offer(best[i * R + r]);
    tokens[r] = all.id;  // never -1: the argmax's own interval reaches the threshold
  }
  return AOTI_TORCH_SUCCESS;
#endif
}

}  // namespace

extern "C" {

// Whether greedy_head can run here (AVX512-BF16, and a compiler that could build it).
int graphgen_greedy_head_supported() {
#ifdef GRAPHGEN_BF16_DOT
  return has_bf16_dot() ? 1 : 0;
#else
  return 0;
#endif
}

AOTITorchError aoti_torch_cpu_greedy_head(AtenTensorHandle x, AtenTensorHandle weight, AtenTensorHandle packed,
                                          AtenTensorHandle norms, AtenTensorHandle* ret0) {
  return greedy_head(x, weight, packed, norms, ret0);
}

}  // extern "C"

// graphgen::greedy_head (graphgen/ops/greedy_head.py): tokens[r] = argmax_n x[r] . w[n] for an fp32 or
// bf16 LM head (bf16 logits rounded to bf16, as the linear kernel returns them), ties to the lowest id,
// without computing every logit exactly.
//
// A greedy step needs only each row's argmax, yet the LM head is the step's largest matrix (bench-125m:
// 32000 x 768, 98 MB). Here an int8 copy of w (`packed`: each row scaled by its largest magnitude,
// made once by the runtime) and x quantized per row to unsigned 8 bits give approximate logits a[n]
// through AVX512-VNNI dot products: a quarter of the bytes and four times the products per cycle of
// fp32 FMAs (Zen 4: 64 a cycle against 16), summed exactly in int32. Each a[n] is within B[n] of the
// exact logit e[n] (below), so only ids whose interval [a - B, a + B] reaches the best lower bound
// max_m (a[m] - B[m]) can be the argmax; those (bench-125m: tens of 32000 a row) are computed exactly
// in fp32 and the largest wins. The argmax of e is always among them: e[n*] >= e[m] >= a[m] - B[m].
//
// The bound. With w_n ~ s_n q_n (q int8, |w - s q| <= s_n / 2 per weight) and x ~ s_x (x_q - 128)
// (|x - s_x (x_q - 128)| <= s_x / 2 per element):
//   |a[n] - e[n]| <= 0.51 (s_n ||x||_1 + s_x s_n ||q_n||_1) + gamma 128 s_n ||x||_1
// where 0.51 covers the rounding of the quotients before they round to integers and gamma = 2.2 (K + 2)
// 2^-24 the fp32 sum of the exact kernel (|w| <= 128 s_n); B is inflated by 1% for the fp32 rounding of
// a and of the bound arithmetic. Rows of x that are not finite, or whose bounds overflow, run every
// logit exactly (NaN wins, as in torch's argmax); a row of zeros has every logit 0: id 0.
#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "kernels.h"

using namespace graphgen;

namespace {

constexpr int64_t kTile = 16;        // vocab rows per packed tile: one zmm of int32 sums
constexpr int64_t kBlockTiles = 3;   // tiles a microkernel call runs: 3 x 8 rows of x = 24 accumulators
constexpr int64_t kBlock = kTile * kBlockTiles;
constexpr int kRowsPerPass = 8;

// v as a logit of dtype T holds it: bf16 rounds to nearest even (NaN stays NaN).
template <typename T>
inline float rounded(float v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
    uint16_t bits;
    store(&bits, v);
    return to_float(bits);
  }
}

bool has_int8_dot() {
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
  static const bool yes = __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512f");
  return yes;
#else
  return false;
#endif
}

// The packed head's per-row data (`rows`, 3 x Vp fp32): each row's scale s_n, s_n ||q_n||_1 (rounded
// up) and sum_k q_nk (an integer, exact in fp32 for K < 2^17).
struct RowInfo {
  const float *scale, *l1, *qsum;
};

#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#define GRAPHGEN_INT8_DOT 1
// Approximate logits of RB rows of x (4 unsigned bytes a lane, xq[r * K4 + kk]) against the
// kBlockTiles tiles at `tiles` (each K4 x 16 x 4 int8), into a[r * ldA + 16 t + i]; lo[r] = max(lo[r],
// a - B) over the block's first `valid` vocab rows, with B = cx[r] s_n + dx[r] l1_n.
template <int RB>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void approx_block(
    const uint32_t* xq, const int8_t* tiles, int64_t K4, float* a, int64_t ldA, const float* sx, const float* cx,
    const float* dx, RowInfo info, int64_t valid, float* lo, const char* next) {
  __m512i acc[RB][kBlockTiles];
  // the next block's tiles (contiguous after these), requested into L2 over the k loop
  const int64_t per_step = next ? kBlockTiles : 0;
#pragma GCC unroll 8
  for (int r = 0; r < RB; ++r)
#pragma GCC unroll 3
    for (int t = 0; t < kBlockTiles; ++t) acc[r][t] = _mm512_setzero_si512();
  for (int64_t kk = 0; kk < K4; ++kk) {
    for (int64_t i = 0; i < per_step; ++i) _mm_prefetch(next + (kk * per_step + i) * 64, _MM_HINT_T1);
    __m512i wv[kBlockTiles];
#pragma GCC unroll 3
    for (int t = 0; t < kBlockTiles; ++t) wv[t] = _mm512_load_si512(tiles + (t * K4 + kk) * kTile * 4);
#pragma GCC unroll 8
    for (int r = 0; r < RB; ++r) {
      const __m512i xv = _mm512_set1_epi32(static_cast<int>(xq[r * K4 + kk]));
#pragma GCC unroll 3
      for (int t = 0; t < kBlockTiles; ++t) acc[r][t] = _mm512_dpbusd_epi32(acc[r][t], xv, wv[t]);
    }
  }
  // the sums leave the registers once (an epilogue that indexes them would keep them in memory)
  alignas(64) int32_t sums[RB][kBlockTiles][kTile];
#pragma GCC unroll 8
  for (int r = 0; r < RB; ++r)
#pragma GCC unroll 3
    for (int t = 0; t < kBlockTiles; ++t) _mm512_store_si512(sums[r][t], acc[r][t]);
  for (int t = 0; t < kBlockTiles; ++t) {
    const int64_t n0 = t * kTile;
    const __mmask16 live = n0 >= valid ? 0 : (valid - n0 >= kTile ? 0xFFFF : (1u << (valid - n0)) - 1);
    const __m512 scale = _mm512_loadu_ps(info.scale + n0), l1 = _mm512_loadu_ps(info.l1 + n0);
    const __m512i offset = _mm512_slli_epi32(_mm512_cvttps_epi32(_mm512_loadu_ps(info.qsum + n0)), 7);  // 128 sum q
    for (int r = 0; r < RB; ++r) {
      const __m512 exact = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_load_si512(sums[r][t]), offset));
      const __m512 approx = _mm512_mul_ps(_mm512_mul_ps(exact, scale), _mm512_set1_ps(sx[r]));
      _mm512_storeu_ps(a + r * ldA + n0, approx);
      const __m512 bound = _mm512_fmadd_ps(_mm512_set1_ps(cx[r]), scale, _mm512_mul_ps(_mm512_set1_ps(dx[r]), l1));
      if (live) lo[r] = std::max(lo[r], _mm512_mask_reduce_max_ps(live, _mm512_sub_ps(approx, bound)));
    }
  }
}

void approx_rows(int rb, const uint32_t* xq, const int8_t* tiles, int64_t K4, float* a, int64_t ldA, const float* sx,
                 const float* cx, const float* dx, RowInfo info, int64_t valid, float* lo, const char* next) {
  switch (rb) {
    case 8: return approx_block<8>(xq, tiles, K4, a, ldA, sx, cx, dx, info, valid, lo, next);
    case 7: return approx_block<7>(xq, tiles, K4, a, ldA, sx, cx, dx, info, valid, lo, next);
    case 6: return approx_block<6>(xq, tiles, K4, a, ldA, sx, cx, dx, info, valid, lo, next);
    case 5: return approx_block<5>(xq, tiles, K4, a, ldA, sx, cx, dx, info, valid, lo, next);
    case 4: return approx_block<4>(xq, tiles, K4, a, ldA, sx, cx, dx, info, valid, lo, next);
    case 3: return approx_block<3>(xq, tiles, K4, a, ldA, sx, cx, dx, info, valid, lo, next);
    case 2: return approx_block<2>(xq, tiles, K4, a, ldA, sx, cx, dx, info, valid, lo, next);
    default: return approx_block<1>(xq, tiles, K4, a, ldA, sx, cx, dx, info, valid, lo, next);
  }
}
#endif

// x . w summed in fp32, as the logit comes out of a linear in T: bf16 logits are rounded to bf16
// (ties in the argmax are then ties of the rounded values).
template <typename T>
inline float exact_logit(const T* x, const T* w, int64_t K) {
  return rounded<T>(dot(x, w, K));
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
  int64_t R, K, V, tiles, K4;
};

AOTITorchError check(AtenTensorHandle x, AtenTensorHandle w, AtenTensorHandle packed, AtenTensorHandle rows,
                     Shapes& s, bool& bf16) {
  const AtenTensorHandle t[4] = {x, w, packed, rows};
  int64_t dims[4], *sizes[4], *strides[4];
  int32_t dtypes[4];
  if (AOTITorchError err = read_args(t, 4, dims, sizes, strides, dtypes)) return err;
  const int32_t f32 = aoti_torch_dtype_float32();
  bf16 = dtypes[0] == aoti_torch_dtype_bfloat16();
  if (dims[0] != 2 || dims[1] != 2 || dtypes[0] != dtypes[1] || !(bf16 || dtypes[0] == f32) ||
      sizes[0][1] != sizes[1][1])
    return fail("greedy_head: x (R, K) and weight (V, K), both float32 or both bfloat16, expected");
  s = {sizes[0][0], sizes[0][1], sizes[1][0], 0, (sizes[0][1] + 3) / 4};
  if (s.K >= (1 << 17)) return fail("greedy_head: K up to 131071 (the packed rows' integer sums are exact below it)");
  if (dims[2] != 4 || dtypes[2] != aoti_torch_dtype_int8() || sizes[2][1] != s.K4 || sizes[2][2] != kTile ||
      sizes[2][3] != 4 || sizes[2][0] % kBlockTiles || sizes[2][0] * kTile < s.V)
    return fail("greedy_head: packed must be (tiles, %lld, 16, 4) int8 with tiles a multiple of %lld covering "
                "%lld rows (ops/greedy_head.py: pack_head)", static_cast<long long>(s.K4),
                static_cast<long long>(kBlockTiles), static_cast<long long>(s.V));
  s.tiles = sizes[2][0];
  if (dims[3] != 2 || dtypes[3] != f32 || sizes[3][0] != 3 || sizes[3][1] != s.tiles * kTile)
    return fail("greedy_head: rows must be (3, %lld) float32", static_cast<long long>(s.tiles * kTile));
  for (int i = 0; i < 4; ++i)
    if (!contiguous(dims[i], sizes[i], strides[i])) return fail("greedy_head: contiguous tensors expected");
  return AOTI_TORCH_SUCCESS;
}

// Every logit of row x exactly; its argmax as torch's argmax takes it.
template <typename T>
int64_t exact_argmax(const T* x, const T* w, int64_t V, int64_t K) {
  std::vector<Best> best(threads());
#pragma omp parallel num_threads(threads())
  {
    Best mine;
#pragma omp for schedule(static)
    for (int64_t n = 0; n < V; ++n) mine.offer(exact_logit(x, w + n * K, K), n);
    best[omp_get_thread_num()] = mine;
  }
  Best all;
  for (const Best& b : best) all.offer(b);
  return all.id;
}

#ifdef GRAPHGEN_INT8_DOT
template <typename T>
void run(const T* x, const T* w, const int8_t* packed, const float* rows, const Shapes& s, int64_t* tokens) {
  const int64_t R = s.R, K = s.K, K4 = s.K4, V = s.V, Vp = s.tiles * kTile, blocks = s.tiles / kBlockTiles;
  const RowInfo info{rows, rows + Vp, rows + 2 * Vp};

  // x quantized per row (4 unsigned bytes a lane, zero at 128), its scale, the bound's two factors
  // (B[n] = cx s_n + dx l1_n), and the rows that take another path: 1 every logit, 2 all zeros
  std::vector<uint32_t> xq(R * K4);
  std::vector<float> sx(R), cx(R), dx(R);
  std::vector<char> path(R, 0);
  const double alpha = (0.51 + 2.2 * (K + 2) * 128.0 / 16777216.0) * 1.01;
  for (int64_t r = 0; r < R; ++r) {
    const T* xr = x + r * K;
    double l1 = 0;
    float peak = 0.f;
    bool finite = true;
    for (int64_t k = 0; k < K; ++k) {
      const float v = to_float(xr[k]);
      finite = finite && std::isfinite(v);
      l1 += std::fabs(static_cast<double>(v));
      peak = std::max(peak, std::fabs(v));
    }
    if (!finite || !std::isfinite(static_cast<float>(l1))) {
      path[r] = 1;
      continue;
    }
    if (peak == 0.f) {
      path[r] = 2;
      continue;
    }
    const float scale = peak / 127.f, inv = 127.f / peak;
    uint8_t* bytes = reinterpret_cast<uint8_t*>(xq.data() + r * K4);
    for (int64_t k = 0; k < K4 * 4; ++k) {
      const float q = k < K ? std::nearbyint(std::min(127.f, std::max(-127.f, to_float(xr[k]) * inv))) : 0.f;
      bytes[k] = static_cast<uint8_t>(static_cast<int>(q) + 128);
    }
    sx[r] = scale;
    const double c = alpha * l1, d = alpha * scale;
    cx[r] = static_cast<float>(c) * (1 + 1e-6f);
    dx[r] = static_cast<float>(d) * (1 + 1e-6f);
    if (!std::isfinite(cx[r]) || !std::isfinite(dx[r])) path[r] = 1;
  }

  // approximate logits, and per thread and row the best lower bound max (a - B)
  thread_local std::vector<float> scratch;
  if (scratch.size() < static_cast<size_t>(R * Vp)) scratch.resize(R * Vp);
  float* a = scratch.data();
  const int nt = threads();
  std::vector<float> lows(nt * R, -std::numeric_limits<float>::infinity());
#pragma omp parallel num_threads(nt)
  {
    float* lo = lows.data() + omp_get_thread_num() * R;
    const int64_t t = omp_get_thread_num(), end = blocks * (t + 1) / nt, block_bytes = kBlockTiles * K4 * kTile * 4;
    for (int64_t b = blocks * t / nt; b < end; ++b) {  // a contiguous run of blocks per thread
      const RowInfo here{info.scale + b * kBlock, info.l1 + b * kBlock, info.qsum + b * kBlock};
      const int8_t* tiles = packed + b * block_bytes;
      for (int64_t r0 = 0; r0 < R; r0 += kRowsPerPass)
        approx_rows(static_cast<int>(std::min<int64_t>(kRowsPerPass, R - r0)), xq.data() + r0 * K4, tiles, K4,
                    a + r0 * Vp + b * kBlock, Vp, sx.data() + r0, cx.data() + r0, dx.data() + r0, here,
                    V - b * kBlock, lo + r0,
                    r0 == 0 && b + 1 < end ? reinterpret_cast<const char*>(tiles + block_bytes) : nullptr);
    }
  }
  std::vector<float> threshold(R);
  for (int64_t r = 0; r < R; ++r) {
    float t = -std::numeric_limits<float>::infinity();
    for (int i = 0; i < nt; ++i) t = std::max(t, lows[i * R + r]);
    threshold[r] = t;
    if (path[r] == 0 && !std::isfinite(t)) path[r] = 1;
  }

  // the candidates, exactly: each thread scans its range of ids for every row (8 at a time), then
  // computes their logits, each weight row requested a few candidates ahead (they are scattered)
  std::vector<Best> best(nt * R);
#pragma omp parallel num_threads(nt)
  {
    const int t = omp_get_thread_num();
    const int64_t n0 = V * t / nt, n1 = V * (t + 1) / nt;
    std::vector<int64_t> ids;
    for (int64_t r = 0; r < R; ++r) {
      if (path[r]) continue;
      const float* ar = a + r * Vp;
      // bf16 logits: an id is out only where its upper bound rounds below the rounded threshold
      const float floor = rounded<T>(threshold[r]);
      const __m256 cr = _mm256_set1_ps(cx[r]), dr = _mm256_set1_ps(dx[r]), tr = _mm256_set1_ps(floor);
      ids.clear();
      int64_t n = n0;
      for (; n + 8 <= n1; n += 8) {
        __m256 hi = _mm256_fmadd_ps(cr, _mm256_loadu_ps(info.scale + n),
                                    _mm256_fmadd_ps(dr, _mm256_loadu_ps(info.l1 + n), _mm256_loadu_ps(ar + n)));
        if constexpr (!std::is_same_v<T, float>) hi = round_bf16(hi);
        for (unsigned m = _mm256_movemask_ps(_mm256_cmp_ps(hi, tr, _CMP_GE_OQ)); m; m &= m - 1)
          ids.push_back(n + __builtin_ctz(m));
      }
      for (; n < n1; ++n)
        if (rounded<T>(ar[n] + cx[r] * info.scale[n] + dx[r] * info.l1[n]) >= floor) ids.push_back(n);
      constexpr size_t kAhead = 3;
      auto request = [&](size_t i) {
        if (i < ids.size()) prefetch_row(w + ids[i] * K, K * static_cast<int64_t>(sizeof(T)));
      };
      for (size_t i = 0; i < kAhead; ++i) request(i);
      Best& mine = best[t * R + r];
      for (size_t i = 0; i < ids.size(); ++i) {
        request(i + kAhead);
        mine.offer(exact_logit(x + r * K, w + ids[i] * K, K), ids[i]);
      }
    }
  }
  for (int64_t r = 0; r < R; ++r) {
    if (path[r] == 1) {
      tokens[r] = exact_argmax(x + r * K, w, V, K);
    } else if (path[r] == 2) {
      tokens[r] = 0;  // x . w = 0 exactly for every id
    } else {
      Best all;
      for (int i = 0; i < nt; ++i) all.offer(best[i * R + r]);
      tokens[r] = all.id;  // never -1: the argmax's own interval reaches the threshold
    }
  }
}
#endif

AOTITorchError greedy_head(AtenTensorHandle xh, AtenTensorHandle wh, AtenTensorHandle ph, AtenTensorHandle rh,
                           AtenTensorHandle* out) {
  g_last_error.clear();
  *out = nullptr;
#ifndef GRAPHGEN_INT8_DOT
  return fail("greedy_head: built without AVX512-VNNI support (needs GCC 11 or later)");
#else
  if (!has_int8_dot()) return fail("greedy_head: this CPU has no AVX512-VNNI dot products");
  Shapes s;
  bool bf16 = false;
  if (AOTITorchError err = check(xh, wh, ph, rh, s, bf16)) return err;
  void *xv = nullptr, *wv = nullptr, *pv = nullptr, *rv = nullptr, *tv = nullptr;
  AOTITorchError err = AOTI_TORCH_SUCCESS;
  if ((err = aoti_torch_get_data_ptr(xh, &xv)) || (err = aoti_torch_get_data_ptr(wh, &wv)) ||
      (err = aoti_torch_get_data_ptr(ph, &pv)) || (err = aoti_torch_get_data_ptr(rh, &rv)))
    return err;
  const int64_t size = s.R, stride = 1;
  if ((err = aoti_torch_empty_strided(1, &size, &stride, aoti_torch_dtype_int64(), aoti_torch_device_type_cpu(), 0,
                                      out)) ||
      (err = aoti_torch_get_data_ptr(*out, &tv)))
    return err;
  const int8_t* packed = static_cast<const int8_t*>(pv);
  const float* rows = static_cast<const float*>(rv);
  int64_t* tokens = static_cast<int64_t*>(tv);
  if (bf16)
    run(static_cast<const uint16_t*>(xv), static_cast<const uint16_t*>(wv), packed, rows, s, tokens);
  else
    run(static_cast<const float*>(xv), static_cast<const float*>(wv), packed, rows, s, tokens);
  return AOTI_TORCH_SUCCESS;
#endif
}

// pack_head (ops/greedy_head.py): w (V, K) fp32 -> packed (tiles, K4, 16, 4) int8 and rows (3, tiles * 16).
// q = round(w * (127 / peak)): within 0.5 s_n + a few ulp of w / s_n, which the bound's 0.51 covers.
// Returns false (the buffers then unusable) where w has a value that is not finite.
template <typename T>
bool pack(const T* w, int64_t V, int64_t K, int8_t* packed, int64_t tiles, float* rows) {
  const int64_t K4 = (K + 3) / 4, Vp = tiles * kTile;
  bool finite = true;
#pragma omp parallel num_threads(threads()) reduction(&& : finite)
  {
    std::vector<int8_t> q(K4 * 4, 0);
#pragma omp for schedule(static)
    for (int64_t tile = 0; tile < tiles; ++tile) {
      int8_t* out = packed + tile * K4 * kTile * 4;
      for (int64_t i = 0; i < kTile; ++i) {
        const int64_t n = tile * kTile + i;
        float scale = 0.f, l1 = 0.f, sum = 0.f;
        std::fill(q.begin(), q.end(), 0);
        if (n < V) {
          const T* row = w + n * K;
          float peak = 0.f;
          for (int64_t k = 0; k < K; ++k) peak = std::max(peak, std::fabs(to_float(row[k])));
          finite = finite && std::isfinite(peak);  // NaN compares false in max: also test the row's sum
          float total = 0.f;
          for (int64_t k = 0; k < K; ++k) total += to_float(row[k]) * 0.f;  // NaN or inf anywhere makes this NaN
          finite = finite && total == 0.f;
          scale = peak / 127.f;
          int32_t abs_sum = 0, q_sum = 0;
          if (peak > 0.f) {
            const float inv = 127.f / peak;
            for (int64_t k = 0; k < K; ++k) {
              const int v = static_cast<int>(std::nearbyint(std::min(127.f, std::max(-127.f, to_float(row[k]) * inv))));
              q[k] = static_cast<int8_t>(v);
              abs_sum += v < 0 ? -v : v, q_sum += v;
            }
          }
          l1 = std::nextafter(static_cast<float>(static_cast<double>(scale) * abs_sum), INFINITY);
          sum = static_cast<float>(q_sum);
        }
        for (int64_t k4 = 0; k4 < K4; ++k4) std::memcpy(out + (k4 * kTile + i) * 4, q.data() + k4 * 4, 4);
        rows[n] = scale, rows[Vp + n] = l1, rows[2 * Vp + n] = sum;
      }
    }
  }
  return finite;
}

}  // namespace

extern "C" {

// Fill greedy_head's packed weight and row data from an fp32 (bf16 = 0) or bf16 head (K < 2^17, checked by
// the caller); 0 where the head has a value that is not finite (no bound holds then), else 1.
int graphgen_greedy_head_pack(const void* w, int bf16, int64_t V, int64_t K, int8_t* packed, int64_t tiles,
                              float* rows) {
  const bool ok = bf16 ? pack(static_cast<const uint16_t*>(w), V, K, packed, tiles, rows)
                       : pack(static_cast<const float*>(w), V, K, packed, tiles, rows);
  return ok ? 1 : 0;
}

// Whether greedy_head can run here (AVX512-VNNI, and a compiler that could build it).
int graphgen_greedy_head_supported() {
#ifdef GRAPHGEN_INT8_DOT
  return has_int8_dot() ? 1 : 0;
#else
  return 0;
#endif
}

AOTITorchError aoti_torch_cpu_greedy_head(AtenTensorHandle x, AtenTensorHandle weight, AtenTensorHandle packed,
                                          AtenTensorHandle rows, AtenTensorHandle* ret0) {
  return greedy_head(x, weight, packed, rows, ret0);
}

}  // extern "C"

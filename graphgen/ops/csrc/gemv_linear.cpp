// graphgen::gemv_linear (graphgen/ops/gemv_linear.py): y = x @ weight.T in fp32 on the CPU, as an
// AOTInductor C shim (aoti_torch_cpu_gemv_linear) that compiled graphs call directly.
//
// Decode multiplies 1-4 activation rows by every weight matrix, so a step is bound by how fast
// the weights stream from memory. MKL's sgemv runs that on one thread on the AVX2 AMD machines
// this project runs on, oneDNN's inner product reaches ~65% of a plain streaming read; here each
// thread reads its own contiguous band of weight rows once, R rows at a time, for all M rows of x
// (docs/performance.md has the measurements). 4-64 fp32 rows and 5 or more bf16 rows (decode at
// larger batches, mixed steps, bf16 prefill; compute-bound) run blocks of several x rows over
// bands of weight rows kept in L1 (`gemm_rows_f32`, `gemm_rows`). Other shapes (more fp32 rows:
// prefill; bf16 past 16 rows on CPUs with native bf16 dot products; strided operands) go to
// oneDNN's inner product (fp32) or ATen's mm (bf16), so the op is correct for every input.
#include <torch/csrc/inductor/aoti_torch/c/shim_cpu.h>
#include <torch/csrc/inductor/aoti_torch/generated/c_shim_cpu.h>

#include <type_traits>
#include <vector>

#include "kernels.h"

using namespace graphgen;

namespace {

// The most rows of x this kernel takes in fp32; more (prefill) go to oneDNN, whose blocking suits
// large GEMMs: the 4x3 blocks beat oneDNN's inner product up to ~64-80 rows on a 125M model's
// shapes here (10-25% at 32-64 rows).
constexpr int64_t kMaxRowsF32 = 64;
// bf16: the most rows where ATen's mm has native bf16 dot products (AVX512-BF16, AMX) and
// outruns the blocks, which widen bf16 to fp32 in registers; without them (AVX2) ATen's bf16 mm
// is its generic path, ~3.5x slower than the blocks at 16-256 rows here, so the blocks take all.
constexpr int64_t kMaxRowsNativeBf16 = 16;

int64_t max_rows_bf16() {
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
  static const int64_t rows = __builtin_cpu_supports("avx512bf16") ? kMaxRowsNativeBf16 : INT64_MAX;
  return rows;
#else
  return kMaxRowsNativeBf16;  // cannot ask the CPU: keep ATen's mm past the decode rows
#endif
}

// y[m, n0 + r] = sum_k x[m, k] * w[n0 + r, k] for m < M, r < R, accumulated in fp32: the R weight
// rows are read once for all M rows of x.
template <int M, int R>
inline void block(const float* x, const float* w, float* y, int64_t n0, int64_t N, int64_t K) {
  __m256 acc[M][R];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    if constexpr (M == 1) {  // each row's load feeds its FMA directly: 8 accumulators, no spills
      const __m256 xv = _mm256_loadu_ps(x + k);
      for (int r = 0; r < R; ++r) acc[0][r] = _mm256_fmadd_ps(_mm256_loadu_ps(w + (n0 + r) * K + k), xv, acc[0][r]);
    } else {
      __m256 wv[R];
      for (int r = 0; r < R; ++r) wv[r] = _mm256_loadu_ps(w + (n0 + r) * K + k);
      for (int m = 0; m < M; ++m) {
        const __m256 xv = _mm256_loadu_ps(x + m * K + k);
        for (int r = 0; r < R; ++r) acc[m][r] = _mm256_fmadd_ps(wv[r], xv, acc[m][r]);
      }
    }
  }
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) {
      float s = hsum(acc[m][r]);
      for (int64_t kk = k; kk < K; ++kk) s += x[m * K + kk] * w[(n0 + r) * K + kk];
      y[m * N + n0 + r] = s;
    }
}

// The bf16 form of `block`. One 32-byte load holds 16 weights; as 8 32-bit lanes, a lane's high
// half is an odd-indexed weight and its low half the even one before it, so a mask and a shift
// give both as fp32 with no shuffle. x was permuted to match (`permute16`): per 16 columns, the 8
// even ones, then the 8 odd ones. A bf16 row is short (1.5 KB at K = 768), too short for the
// hardware prefetcher to ramp up on, so the block also prefetches the R rows after it (the
// thread's next block: contiguous memory), a slice per step, before it needs them.
template <int M, int R>
inline void block_bf16(const float* x, const uint16_t* w, uint16_t* y, int64_t n0, int64_t N, int64_t K) {
  const __m256i odd = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  __m256 acc[M][R];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm256_setzero_ps();
  const char* next = reinterpret_cast<const char*>(w + (n0 + R) * K);
  const int64_t ahead = n0 + 2 * R <= N ? R * K * 2 : 0;  // bytes of the next block (none past the end)
  int64_t fetched = 0;
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    for (const int64_t due = (k + 16) * ahead / K; fetched < due; fetched += 64) _mm_prefetch(next + fetched, _MM_HINT_T0);
    __m256 we[R], wo[R];
    for (int r = 0; r < R; ++r) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + (n0 + r) * K + k));
      we[r] = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
      wo[r] = _mm256_castsi256_ps(_mm256_and_si256(v, odd));
    }
    for (int m = 0; m < M; ++m) {
      const __m256 xe = _mm256_loadu_ps(x + m * K + k), xo = _mm256_loadu_ps(x + m * K + k + 8);
      for (int r = 0; r < R; ++r) acc[m][r] = _mm256_fmadd_ps(wo[r], xo, _mm256_fmadd_ps(we[r], xe, acc[m][r]));
    }
  }
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) {
      float s = hsum(acc[m][r]);
      for (int64_t kk = k; kk < K; ++kk) s += x[m * K + kk] * to_float(w[(n0 + r) * K + kk]);
      store(y + m * N + n0 + r, s);
    }
}

// x (rows, K) bf16 -> fp32 in the column order block_bf16 reads: per full 16 columns the even
// ones, then the odd ones; the last K % 16 as they are.
void permute16(const uint16_t* x, float* out, int64_t rows, int64_t K) {
  for (int64_t m = 0; m < rows; ++m) {
    const uint16_t* xr = x + m * K;
    float* o = out + m * K;
    int64_t k = 0;
    for (; k + 16 <= K; k += 16)
      for (int i = 0; i < 8; ++i) {
        o[k + i] = to_float(xr[k + 2 * i]);
        o[k + 8 + i] = to_float(xr[k + 2 * i + 1]);
      }
    for (; k < K; ++k) o[k] = to_float(xr[k]);
  }
}

template <typename T, int M, int R>
inline void tile(const float* x, const T* w, T* y, int64_t n0, int64_t N, int64_t K) {
  if constexpr (std::is_same_v<T, float>)
    block<M, R>(x, w, y, n0, N, K);
  else
    block_bf16<M, R>(x, w, y, n0, N, K);
}

template <typename T, int M>
void gemv(const float* x, const T* w, T* y, int64_t N, int64_t K) {
  constexpr int R = M == 1 ? 8 : (M == 2 ? 4 : 2);  // accumulators + loads fit the 16 ymm registers
  const int64_t full = N / R * R;
#pragma omp parallel for schedule(static) num_threads(threads())
  for (int64_t n = 0; n < full; n += R) tile<T, M, R>(x, w, y, n, N, K);
  for (int64_t n = full; n < N; ++n) tile<T, M, 1>(x, w, y, n, N, K);
}

// R weight rows from n0 times every row of x, 2 rows of x at a time: the R rows come from memory
// once and stay in L1 while each pair of x's rows (in L2) runs over them.
template <typename T, int R>
inline void band(const float* x, const T* w, T* y, int64_t rows, int64_t n0, int64_t N, int64_t K) {
  int64_t m = 0;
  for (; m + 2 <= rows; m += 2) tile<T, 2, R>(x + m * K, w, y + m * N, n0, N, K);
  if (m < rows) tile<T, 1, R>(x + m * K, w, y + m * N, n0, N, K);  // an odd last row
}

// 5 or more rows of x in bf16 (decode at batch 5-16, mixed steps, prefill): bands of 4 weight
// rows, 2 rows of x against them (8 accumulators + 8 weight halves + 2 x loads: 4 x-rows would
// spill).
template <typename T>
void gemm_rows(const float* x, const T* w, T* y, int64_t rows, int64_t N, int64_t K) {
  constexpr int R = 4;
  const int64_t full = N / R * R;
#pragma omp parallel for schedule(static) num_threads(threads())
  for (int64_t n = 0; n < full; n += R) band<T, R>(x, w, y, rows, n, N, K);
  for (int64_t n = full; n < N; ++n) band<T, 1>(x, w, y, rows, n, N, K);
}

// R fp32 weight rows from n0 times every row of x, 4 rows of x at a time (12 accumulators + 3
// weight loads + 1 x load fill the 16 registers; 4 x 3 beat 2 x 4, 3 x 4 and 3 x 3 in L1 here).
// Each pass over the band also prefetches a slice of `ahead` (the band kAheadBands after this one),
// so its weights are in L1 before the first pass over it: without that, that pass waits on memory
// and the whole step ran at ~50 GFLOPS instead of ~80-90.
template <int R>
inline void band_f32(const float* x, const float* w, float* y, int64_t rows, int64_t n0, int64_t N, int64_t K,
                     const char* ahead, int64_t ahead_bytes) {
  const int64_t per_pass = (ahead_bytes / 64 + (rows + 3) / 4 - 1) / ((rows + 3) / 4);  // cache lines
  int64_t fetched = 0;
  auto prefetch = [&] {
    for (int64_t i = 0; i < per_pass && fetched < ahead_bytes; ++i, fetched += 64) _mm_prefetch(ahead + fetched, _MM_HINT_T0);
  };
  int64_t m = 0;
  for (; m + 4 <= rows; m += 4) {
    prefetch();
    block<4, R>(x + m * K, w, y + m * N, n0, N, K);
  }
  prefetch();
  if (rows - m == 3) block<3, R>(x + m * K, w, y + m * N, n0, N, K);
  if (rows - m == 2) block<2, R>(x + m * K, w, y + m * N, n0, N, K);
  if (rows - m == 1) block<1, R>(x + m * K, w, y + m * N, n0, N, K);
}

// 4 to kMaxRowsF32 rows of x in fp32 (decode at batch 4-16, mixed steps up to 64 rows):
// compute-bound rather than bandwidth-bound, where oneDNN's inner product reaches ~25-40 GFLOPS at
// 16 rows on a 125M model's shapes here. Bands of 3 weight rows, each prefetched two bands ahead
// (`band_f32`); x's rows stay in L2 while every group of 4 runs over the band in L1.
void gemm_rows_f32(const float* x, const float* w, float* y, int64_t rows, int64_t N, int64_t K) {
  constexpr int R = 3;
  constexpr int64_t kAheadBands = 2;  // 1 and 8 were slower, 2-4 alike
  const int64_t full = N / R * R;
#pragma omp parallel for schedule(static) num_threads(threads())
  for (int64_t n = 0; n < full; n += R) {
    const int64_t ahead = n + kAheadBands * R;
    band_f32<R>(x, w, y, rows, n, N, K, reinterpret_cast<const char*>(w + ahead * K),
                ahead + R <= full ? R * K * static_cast<int64_t>(sizeof(float)) : 0);
  }
  for (int64_t n = full; n < N; ++n) band_f32<1>(x, w, y, rows, n, N, K, nullptr, 0);
}

template <typename T>
void run(const void* xp, const void* wp, void* yp, int64_t rows, int64_t N, int64_t K) {
  const T* x = static_cast<const T*>(xp);
  std::vector<float> permuted;
  const float* xf;
  if constexpr (std::is_same_v<T, float>) {
    xf = x;
  } else {
    permuted.resize(rows * K);
    permute16(x, permuted.data(), rows, K);
    xf = permuted.data();
  }
  const T* w = static_cast<const T*>(wp);
  T* y = static_cast<T*>(yp);
  if constexpr (std::is_same_v<T, float>) {
    if (rows >= 4) return gemm_rows_f32(xf, w, y, rows, N, K);  // at 4 rows ~15% faster than gemv<4>
  }
  switch (rows) {
    case 1: gemv<T, 1>(xf, w, y, N, K); break;
    case 2: gemv<T, 2>(xf, w, y, N, K); break;
    case 3: gemv<T, 3>(xf, w, y, N, K); break;
    case 4: gemv<T, 4>(xf, w, y, N, K); break;
    default: gemm_rows<T>(xf, w, y, rows, N, K); break;
  }
}

// bf16 beyond the GEMV path (more rows, strided operands): ATen's mm (oneDNN for bf16) on
// contiguous (rows, K) @ (K, N) views, into the (..., N) output.
AOTITorchError bf16_mm(AtenTensorHandle x, int64_t xdim, const int64_t* xs, const int64_t* xst, AtenTensorHandle w,
                       const int64_t* ws, const int64_t* wst, AtenTensorHandle out, int64_t rows) {
  const int64_t N = ws[0], K = ws[1];
  AtenTensorHandle owned[5] = {};
  auto finish = [&](AOTITorchError e) {
    for (AtenTensorHandle h : owned)
      if (h) aoti_torch_delete_tensor_object(h);
    return e;
  };
  // t itself where contiguous, else a contiguous copy of it (kept in owned[slot])
  auto dense = [&](AtenTensorHandle t, int64_t dim, const int64_t* sizes, const int64_t* strides, int slot,
                   AtenTensorHandle* result) {
    *result = t;
    if (contiguous(dim, sizes, strides)) return AOTI_TORCH_SUCCESS;
    int64_t dense_strides[8];
    contiguous_strides(dim, sizes, dense_strides);
    AOTITorchError e = aoti_torch_empty_strided(dim, sizes, dense_strides, aoti_torch_dtype_bfloat16(),
                                                aoti_torch_device_type_cpu(), 0, &owned[slot]);
    if (!e) e = aoti_torch_copy_(owned[slot], t, 0);
    if (!e) *result = owned[slot];
    return e;
  };
  AOTITorchError err = AOTI_TORCH_SUCCESS;
  AtenTensorHandle xc = x, wc = w;
  if ((err = dense(x, xdim, xs, xst, 0, &xc)) || (err = dense(w, 2, ws, wst, 1, &wc))) return finish(err);
  const int64_t x2_sizes[2] = {rows, K}, x2_strides[2] = {K, 1};
  const int64_t wt_sizes[2] = {K, N}, wt_strides[2] = {1, K};
  const int64_t y2_sizes[2] = {rows, N}, y2_strides[2] = {N, 1};
  // Views of xc, wc and out themselves: the offset argument is added to each one's own offset.
  if ((err = aoti_torch__reinterpret_tensor(xc, 2, x2_sizes, x2_strides, 0, &owned[2])) ||
      (err = aoti_torch__reinterpret_tensor(wc, 2, wt_sizes, wt_strides, 0, &owned[3])) ||
      (err = aoti_torch__reinterpret_tensor(out, 2, y2_sizes, y2_strides, 0, &owned[4])))
    return finish(err);
  return finish(aoti_torch_cpu_mm_out(owned[4], owned[2], owned[3]));
}

}  // namespace

extern "C" {

void graphgen_set_num_threads(int threads) { g_threads.store(threads, std::memory_order_relaxed); }

const char* graphgen_last_error() { return g_last_error.c_str(); }

AOTITorchError aoti_torch_cpu_gemv_linear(AtenTensorHandle x, AtenTensorHandle weight, AtenTensorHandle* ret0) {
  g_last_error.clear();
  int64_t xdim = 0, wdim = 0;
  int64_t *xs = nullptr, *xst = nullptr, *ws = nullptr, *wst = nullptr;
  int32_t xdtype = 0, wdtype = 0;
  AOTITorchError err = AOTI_TORCH_SUCCESS;
  if ((err = aoti_torch_get_dim(x, &xdim)) || (err = aoti_torch_get_dim(weight, &wdim)) ||
      (err = aoti_torch_get_sizes(x, &xs)) || (err = aoti_torch_get_strides(x, &xst)) ||
      (err = aoti_torch_get_sizes(weight, &ws)) || (err = aoti_torch_get_strides(weight, &wst)) ||
      (err = aoti_torch_get_dtype(x, &xdtype)) || (err = aoti_torch_get_dtype(weight, &wdtype)))
    return err;
  const bool f32 = xdtype == aoti_torch_dtype_float32() && wdtype == aoti_torch_dtype_float32();
  const bool bf16 = xdtype == aoti_torch_dtype_bfloat16() && wdtype == aoti_torch_dtype_bfloat16();
  if (xdim < 1 || xdim > 8 || wdim != 2 || xs[xdim - 1] != ws[1] || !(f32 || bf16))
    return fail("gemv_linear: x (..., K) with 1-8 dims and weight (N, K), both float32 or both bfloat16, expected");
  int64_t rows = 1;
  for (int64_t i = 0; i + 1 < xdim; ++i) rows *= xs[i];
  const int64_t N = ws[0], K = ws[1];
  const bool fast = rows >= 1 && rows <= (f32 ? kMaxRowsF32 : max_rows_bf16()) && contiguous(xdim, xs, xst) &&
                    contiguous(2, ws, wst);
  if (!fast && f32)  // oneDNN's inner product: faster than MKL's sgemm here when compute-bound
    return aoti_torch_cpu__linear_pointwise(x, weight, nullptr, "none", nullptr, 0, nullptr, ret0);

  int64_t sizes[8], strides[8];
  for (int64_t i = 0; i + 1 < xdim; ++i) sizes[i] = xs[i];
  sizes[xdim - 1] = N;
  contiguous_strides(xdim, sizes, strides);
  if ((err = aoti_torch_empty_strided(xdim, sizes, strides, xdtype, aoti_torch_device_type_cpu(), 0, ret0)))
    return err;
  if (!fast) return bf16_mm(x, xdim, xs, xst, weight, ws, wst, *ret0, rows);
  void *xp = nullptr, *wp = nullptr, *yp = nullptr;
  if ((err = aoti_torch_get_data_ptr(x, &xp)) || (err = aoti_torch_get_data_ptr(weight, &wp)) ||
      (err = aoti_torch_get_data_ptr(*ret0, &yp)))
    return err;
  if (f32)
    run<float>(xp, wp, yp, rows, N, K);
  else
    run<uint16_t>(xp, wp, yp, rows, N, K);
  return AOTI_TORCH_SUCCESS;
}

}  // extern "C"

// graphgen::gemv_linear (graphgen/ops/gemv_linear.py): y = x @ weight.T in fp32 on the CPU, as an
// AOTInductor C shim (aoti_torch_cpu_gemv_linear) that compiled graphs call directly.
//
// Decode multiplies 1-4 activation rows by every weight matrix, so a step is bound by how fast
// the weights stream from memory. MKL's sgemv runs that on one thread on the AVX2 AMD machines
// this project runs on, oneDNN's inner product reaches ~65% of a plain streaming read; here each
// thread reads its own contiguous band of weight rows once, R rows at a time, for all M rows of x
// (docs/performance.md has the measurements). Other shapes (M > 4, strided operands) go to
// oneDNN's inner product through its own shim, so the op is correct for every input.
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/inductor/aoti_torch/c/shim_cpu.h>
#include <torch/csrc/inductor/aoti_torch/generated/c_shim_cpu.h>

#include <immintrin.h>
#include <omp.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

std::atomic<int> g_threads{0};  // 0: OpenMP's default

inline float hsum(__m256 v) {
  __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {  // 8 bf16 -> fp32: the bf16 bits are the fp32's high half
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}
inline float to_float(float v) { return v; }
inline float to_float(uint16_t v) {
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
inline void store(float* y, float v) { *y = v; }
inline void store(uint16_t* y, float v) {  // round to nearest even, as torch's fp32 -> bf16 does
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  *y = std::isnan(v) ? uint16_t{0x7fc0} : static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

// y[m, n0 + r] = sum_k x[m, k] * w[n0 + r, k] for m < M, r < R, accumulated in fp32: the R weight
// rows are read once for all M rows of x (x is fp32 here; bf16 x was widened once per call).
template <typename T, int M, int R>
inline void block(const float* x, const T* w, T* y, int64_t n0, int64_t N, int64_t K) {
  __m256 acc[M][R];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    if constexpr (M == 1) {  // each row's load feeds its FMA directly: 8 accumulators, no spills
      const __m256 xv = _mm256_loadu_ps(x + k);
      for (int r = 0; r < R; ++r) acc[0][r] = _mm256_fmadd_ps(load8(w + (n0 + r) * K + k), xv, acc[0][r]);
    } else {
      __m256 wv[R];
      for (int r = 0; r < R; ++r) wv[r] = load8(w + (n0 + r) * K + k);
      for (int m = 0; m < M; ++m) {
        const __m256 xv = _mm256_loadu_ps(x + m * K + k);
        for (int r = 0; r < R; ++r) acc[m][r] = _mm256_fmadd_ps(wv[r], xv, acc[m][r]);
      }
    }
  }
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) {
      float s = hsum(acc[m][r]);
      for (int64_t kk = k; kk < K; ++kk) s += x[m * K + kk] * to_float(w[(n0 + r) * K + kk]);
      store(y + m * N + n0 + r, s);
    }
}

template <typename T, int M>
void gemv(const float* x, const T* w, T* y, int64_t N, int64_t K) {
  constexpr int R = M == 1 ? 8 : (M == 2 ? 4 : 2);  // accumulators + loads fit the 16 ymm registers
  const int64_t full = N / R * R;
  const int threads = g_threads.load(std::memory_order_relaxed);
#pragma omp parallel for schedule(static) num_threads(threads > 0 ? threads : omp_get_max_threads())
  for (int64_t n = 0; n < full; n += R) block<T, M, R>(x, w, y, n, N, K);
  for (int64_t n = full; n < N; ++n) block<T, M, 1>(x, w, y, n, N, K);
}

template <typename T>
void run(const void* xp, const void* wp, void* yp, int64_t rows, int64_t N, int64_t K) {
  const T* x = static_cast<const T*>(xp);
  std::vector<float> widened;
  const float* xf;
  if constexpr (std::is_same_v<T, float>) {
    xf = x;
  } else {
    widened.resize(rows * K);
    for (int64_t i = 0; i < rows * K; ++i) widened[i] = to_float(x[i]);
    xf = widened.data();
  }
  const T* w = static_cast<const T*>(wp);
  T* y = static_cast<T*>(yp);
  switch (rows) {
    case 1: gemv<T, 1>(xf, w, y, N, K); break;
    case 2: gemv<T, 2>(xf, w, y, N, K); break;
    case 3: gemv<T, 3>(xf, w, y, N, K); break;
    default: gemv<T, 4>(xf, w, y, N, K); break;
  }
}

// The row-major strides of `sizes` into `strides`.
void contiguous_strides(int64_t dim, const int64_t* sizes, int64_t* strides) {
  for (int64_t i = dim - 1, s = 1; i >= 0; --i) {
    strides[i] = s;
    s *= sizes[i];
  }
}

bool contiguous(int64_t dim, const int64_t* sizes, const int64_t* strides) {
  int64_t expected = 1;
  for (int64_t i = dim - 1; i >= 0; --i) {
    if (sizes[i] != 1 && strides[i] != expected) return false;
    expected *= sizes[i];
  }
  return true;
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
  AOTITorchError err = AOTI_TORCH_SUCCESS;
  AtenTensorHandle xc = x, wc = w;
  if (!contiguous(xdim, xs, xst)) {
    int64_t strides[8];
    contiguous_strides(xdim, xs, strides);
    if ((err = aoti_torch_empty_strided(xdim, xs, strides, aoti_torch_dtype_bfloat16(), aoti_torch_device_type_cpu(), 0,
                                        &owned[0])) ||
        (err = aoti_torch_copy_(owned[0], x, 0)))
      return finish(err);
    xc = owned[0];
  }
  if (!contiguous(2, ws, wst)) {
    const int64_t strides[2] = {K, 1};
    if ((err = aoti_torch_empty_strided(2, ws, strides, aoti_torch_dtype_bfloat16(), aoti_torch_device_type_cpu(), 0,
                                        &owned[1])) ||
        (err = aoti_torch_copy_(owned[1], w, 0)))
      return finish(err);
    wc = owned[1];
  }
  int64_t x_off = 0, w_off = 0;
  if ((err = aoti_torch_get_storage_offset(xc, &x_off)) || (err = aoti_torch_get_storage_offset(wc, &w_off)))
    return finish(err);
  const int64_t x2_sizes[2] = {rows, K}, x2_strides[2] = {K, 1};
  const int64_t wt_sizes[2] = {K, N}, wt_strides[2] = {1, K};
  const int64_t y2_sizes[2] = {rows, N}, y2_strides[2] = {N, 1};
  if ((err = aoti_torch__reinterpret_tensor(xc, 2, x2_sizes, x2_strides, x_off, &owned[2])) ||
      (err = aoti_torch__reinterpret_tensor(wc, 2, wt_sizes, wt_strides, w_off, &owned[3])) ||
      (err = aoti_torch__reinterpret_tensor(out, 2, y2_sizes, y2_strides, 0, &owned[4])))
    return finish(err);
  return finish(aoti_torch_cpu_mm_out(owned[4], owned[2], owned[3]));
}

}  // namespace

extern "C" {

void graphgen_gemv_set_num_threads(int threads) { g_threads.store(threads, std::memory_order_relaxed); }

AOTITorchError aoti_torch_cpu_gemv_linear(AtenTensorHandle x, AtenTensorHandle weight, AtenTensorHandle* ret0) {
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
  if (xdim < 1 || xdim > 8 || wdim != 2 || xs[xdim - 1] != ws[1] || !(f32 || bf16)) return AOTI_TORCH_FAILURE;
  int64_t rows = 1;
  for (int64_t i = 0; i + 1 < xdim; ++i) rows *= xs[i];
  const int64_t N = ws[0], K = ws[1];
  const bool fast = rows >= 1 && rows <= 4 && contiguous(xdim, xs, xst) && contiguous(2, ws, wst);
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

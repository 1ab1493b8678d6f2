// What graphgen's CPU kernels (csrc/*.cpp, built together into one library by ops/cpu_kernels.py)
// share: the OpenMP thread count the runtime sets, the last error for people, small AVX2 helpers.
#pragma once

#include <torch/csrc/inductor/aoti_torch/c/shim.h>

#include <immintrin.h>
#include <omp.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

namespace graphgen {

inline std::atomic<int> g_threads{0};  // 0: OpenMP's default
inline thread_local std::string g_last_error;  // why this thread's last failing call failed

inline int threads() {
  const int t = g_threads.load(std::memory_order_relaxed);
  return t > 0 ? t : omp_get_max_threads();
}

// Record why a call fails, for the error Python raises; returns the failure code to pass on.
template <typename... Args>
AOTITorchError fail(const char* format, Args... args) {
  char buf[512];
  std::snprintf(buf, sizeof buf, format, args...);
  g_last_error = buf;
  return AOTI_TORCH_FAILURE;
}

inline float hsum(__m256 v) {
  __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

inline float to_float(float v) { return v; }
inline float to_float(uint16_t v) {  // bf16 bits are the fp32's high half
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

// exp of 8 lanes: 2^n * p(r) with x = n ln2 + r, |r| <= ln2 / 2 (Cephes' expf polynomial), within
// ~2 ulp of expf; inputs below -87.3 (exp under FLT_MIN) give FLT_MIN-sized values, not 0, and
// inputs above 88.3 give exp(88.3) (finite).
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // ln2 in two parts: r exact
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(scale));
}

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {  // 8 bf16 -> fp32: the bf16 bits are the fp32's high half
  return _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}

// The cache lines of a row of `bytes`: requested now, read soon (into L1; _MM_HINT_T1: into L2
// only, for rows read later than the next few).
template <auto hint = _MM_HINT_T0>  // auto: an enum in GCC's headers, an int in Clang's
inline void prefetch_row(const void* row, int64_t bytes) {
  const char* p = static_cast<const char*>(row);
  for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch(p + b, hint);
}

// a . b over n elements (fp32 or bf16 each), summed in fp32: 8 lanes, then their sum, then the tail.
template <typename A, typename B>
inline float dot(const A* a, const B* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(load8(a + i), load8(b + i), acc);
  float s = hsum(acc);
  for (; i < n; ++i) s += to_float(a[i]) * to_float(b[i]);
  return s;
}

// v rounded to bf16 precision (nearest, ties to even, as `store` rounds), still as fp32; NaN stays NaN.
inline __m256 round_bf16(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i up = _mm256_add_epi32(bits, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), odd));
  const __m256 rounded = _mm256_castsi256_ps(_mm256_and_si256(up, _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
  return _mm256_blendv_ps(rounded, v, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
}

inline void store8(float* y, __m256 v) { _mm256_storeu_ps(y, v); }
inline void store8(uint16_t* y, __m256 v) {  // rounded as `store` rounds
  const __m256i high = _mm256_srli_epi32(_mm256_castps_si256(round_bf16(v)), 16);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(y),
                   _mm_packus_epi32(_mm256_castsi256_si128(high), _mm256_extracti128_si256(high, 1)));
}

// The row-major strides of `sizes` into `strides`.
inline void contiguous_strides(int64_t dim, const int64_t* sizes, int64_t* strides) {
  for (int64_t i = dim - 1, s = 1; i >= 0; --i) {
    strides[i] = s;
    s *= sizes[i];
  }
}

inline bool contiguous(int64_t dim, const int64_t* sizes, const int64_t* strides) {
  int64_t expected = 1;
  for (int64_t i = dim - 1; i >= 0; --i) {
    if (sizes[i] != 1 && strides[i] != expected) return false;
    expected *= sizes[i];
  }
  return true;
}

// Dims, sizes, strides and dtypes of the n tensors of a shim call, for its checks; the first
// failing query's code.
inline AOTITorchError read_args(const AtenTensorHandle* t, int n, int64_t* dims, int64_t** sizes, int64_t** strides,
                                int32_t* dtypes) {
  AOTITorchError err = AOTI_TORCH_SUCCESS;
  for (int i = 0; i < n; ++i)
    if ((err = aoti_torch_get_dim(t[i], &dims[i])) || (err = aoti_torch_get_sizes(t[i], &sizes[i])) ||
        (err = aoti_torch_get_strides(t[i], &strides[i])) || (err = aoti_torch_get_dtype(t[i], &dtypes[i])))
      return err;
  return err;
}

// An int32 or int64 tensor's numel elements, in row-major order through its strides, as int64 into
// out (block tables and lengths: small). `op` and `name` say whose argument had another dtype.
inline AOTITorchError read_ints(AtenTensorHandle t, int64_t numel, const int64_t* sizes, const int64_t* strides,
                                int64_t dim, std::vector<int64_t>& out, const char* op, const char* name) {
  int32_t dtype = 0;
  void* data = nullptr;
  AOTITorchError err = AOTI_TORCH_SUCCESS;
  if ((err = aoti_torch_get_dtype(t, &dtype)) || (err = aoti_torch_get_data_ptr(t, &data))) return err;
  const bool i32 = dtype == aoti_torch_dtype_int32();
  if (!i32 && dtype != aoti_torch_dtype_int64()) return fail("%s: %s must be int32 or int64", op, name);
  out.resize(numel);
  for (int64_t i = 0; i < numel; ++i) {
    int64_t offset = 0, rest = i;
    for (int64_t d = dim - 1; d >= 0; --d) {
      offset += (rest % sizes[d]) * strides[d];
      rest /= sizes[d];
    }
    out[i] = i32 ? static_cast<const int32_t*>(data)[offset] : static_cast<const int64_t*>(data)[offset];
  }
  return AOTI_TORCH_SUCCESS;
}

}  // namespace graphgen

extern "C" {
void graphgen_set_num_threads(int threads);
const char* graphgen_last_error();
}

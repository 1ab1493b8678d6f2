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

}  // namespace graphgen

extern "C" {
void graphgen_set_num_threads(int threads);
const char* graphgen_last_error();
}

// graphgen::gemv_linear (graphgen/ops/gemv_linear.py): y = x @ weight.T in fp32 or bf16 on the CPU,
// as an AOTInductor C shim (aoti_torch_cpu_gemv_linear) that compiled graphs call directly.
//
// Batch-1 decode multiplies 1-3 activation rows by every weight matrix, so a step is bound by how
// fast the weights stream from memory. MKL's sgemv runs that on one thread on the AVX2 AMD machines
// this project runs on, and oneDNN's inner product reaches ~65% of a plain streaming read. Here
// (`gemv`) each thread reads its own contiguous band of weight rows once, R rows at a time, for all
// rows of x. 4 or more rows (decode at larger batches, mixed steps, prefill) run panels
// (`gemm_panels`): x transposed into panels of 16 rows, an outer-product microkernel, weight tiles
// prefetched ahead. docs/performance.md has the measurements. Other inputs go to ATen: strided
// operands (oneDNN's inner product in fp32, ATen's mm in bf16), and bf16 past 16 rows on CPUs with
// native bf16 dot products (ATen's mm), so the op is correct for every input. The same passes serve
// gemv_linear2/3 (2 or 3 weights that read one x) and gemv_gated (a gated MLP's silu(x @ gate.T) *
// (x @ up.T), the product written in place of the two outputs).
#include <torch/csrc/inductor/aoti_torch/c/shim_cpu.h>
#include <torch/csrc/inductor/aoti_torch/generated/c_shim_cpu.h>

#include <algorithm>
#include <atomic>
#include <memory>
#include <type_traits>
#include <vector>

#include "kernels.h"

using namespace graphgen;

namespace {

// Rows of x from which the panels run; fewer take the GEMV (`gemv`).
constexpr int64_t kMinPanelRows = 4;
// bf16: the most rows this kernel takes where ATen's mm has native bf16 dot products (AVX512-BF16,
// AMX) and outruns the panels, which widen bf16 to fp32; without them (AVX2) ATen's bf16 mm is its
// generic path, ~3.5x slower than this kernel at 16-256 rows here, so the kernel takes all rows.
constexpr int64_t kMaxRowsNativeBf16 = 16;
// The most weights one call takes (gemv_linear3: q, k and v).
constexpr int kMaxLinears = 3;

int64_t max_rows_bf16() {
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
  static const int64_t rows = __builtin_cpu_supports("avx512bf16") ? kMaxRowsNativeBf16 : INT64_MAX;
  return rows;
#else
  return kMaxRowsNativeBf16;  // cannot ask the CPU: keep ATen's mm past the decode rows
#endif
}

// y[m, n0 + r] = sum_k x[m, k] * w[n0 + r, k] for m < M, r < R, accumulated in fp32: the R weight
// rows are read once for all M rows of x. The block also requests the R rows after it (the
// thread's next block: contiguous memory) into L2, a slice per k step: R concurrent row streams
// alone left the memory idle between them. C harness, bench-125m's weights (huge pages), 2
// threads: 1 row ~10% faster (40 -> 44 GB/s), 2 rows ~18%, 3 rows (R = 2) ~43%; into L1 (T0) was
// no faster at 1 row, two blocks ahead slower.
template <int M, int R>
inline void block(const float* x, const float* w, float* y, int64_t n0, int64_t N, int64_t K) {
  __m256 acc[M][R];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm256_setzero_ps();
  const char* next = reinterpret_cast<const char*>(w + (n0 + R) * K);
  const int64_t per_step = n0 + 2 * R <= N ? R * 8 * static_cast<int64_t>(sizeof(float)) : 0;  // none past the end
  int64_t due = 0, fetched = 0;
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    for (due += per_step; fetched < due; fetched += 64) _mm_prefetch(next + fetched, _MM_HINT_T1);
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
// thread's next block: contiguous memory), a slice per step, before it needs them: into L2 at 1
// row (C harness: 5-20% faster than into L1), into L1 at 2-3 rows (level at 2, L2 ~20% slower at 3).
template <int M, int R>
inline void block_bf16(const float* x, const uint16_t* w, uint16_t* y, int64_t n0, int64_t N, int64_t K) {
  const __m256i odd = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  __m256 acc[M][R];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm256_setzero_ps();
  const char* next = reinterpret_cast<const char*>(w + (n0 + R) * K);
  const int64_t per_step = n0 + 2 * R <= N ? R * 16 * static_cast<int64_t>(sizeof(uint16_t)) : 0;  // none past the end
  int64_t due = 0, fetched = 0;
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    for (due += per_step; fetched < due; fetched += 64) _mm_prefetch(next + fetched, M == 1 ? _MM_HINT_T1 : _MM_HINT_T0);
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

// One weight matrix of a call: w (N, K) and its output y (rows, N). A call takes one matrix, or
// several that share x (a layer's q, k and v projections; gate and up), as one pass.
template <typename T>
struct Linear {
  const T* w;
  T* y;
  int64_t N;
};

template <typename T, int M>
void gemv(const float* x, const Linear<T>* mats, int count, int64_t K) {
  constexpr int R = M == 1 ? 8 : (M == 2 ? 4 : 2);  // accumulators + loads fit the 16 ymm registers
  int64_t bands = 0;  // full bands of R rows, over all matrices in order
  for (int i = 0; i < count; ++i) bands += mats[i].N / R;
#pragma omp parallel num_threads(threads())
  {
    // a thread's contiguous range of bands: matrix by matrix, from the matrix its first band is in
    const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
    int64_t b = bands * t / nt, end = bands * (t + 1) / nt, before = 0;
    for (int i = 0; i < count && b < end; ++i) {
      const Linear<T>& m = mats[i];
      const int64_t here = m.N / R;
      for (; b < end && b < before + here; ++b) tile<T, M, R>(x, m.w, m.y, (b - before) * R, m.N, K);
      before += here;
    }
  }
  for (int i = 0; i < count; ++i)
    for (int64_t n = mats[i].N / R * R; n < mats[i].N; ++n) tile<T, M, 1>(x, mats[i].w, mats[i].y, n, mats[i].N, K);
}

// ---- Panels: 4 or more rows of x (decode at batch 4+, mixed steps, prefill) ----
//
// Dot-product blocks (`block`) need a load of x and one of the weights for every FMA, with x's rows
// coming from L2 for each band of weight rows; that held 4-64 rows to ~55-60% of the FMA peak.
// Here x is transposed once per call into panels of 16 rows (K x 16 fp32, `pack_panel`), and the
// microkernel (`panel_kernel`) takes outer products: per k, two loads of a panel and a broadcast of
// each of 6 weights feed 12 FMAs into 12 accumulators, with no horizontal sums. In L1 it runs at
// ~98% of a core's FMA peak here; on a model's weights, which come from memory, each group of weight
// rows prefetches the group kAheadGroups after it, a few lines every 16 k steps
// (docs/performance.md has the measurements). bf16 weights are widened a tile at a
// time (a group's rows over a block of K) into a per-thread fp32 buffer that the same kernel reads.
constexpr int kPanelRows = 16;        // rows of x per panel: 2 vectors
constexpr int kBandRows = 6;          // weight rows per microkernel call: 12 accumulators + 2 + 1
constexpr int kGroupBands = 2;        // bands a thread runs over a whole chunk of panels
constexpr int64_t kAheadGroups = 2;   // prefetch distance, in groups (1 and 4 were slower)
constexpr int64_t kMaxKBlock = 1024;  // longer K runs in blocks, summed in the scratch tile
constexpr int64_t kChunkPanels = 8;   // 128 rows of x per pass over the weights (prefill)

inline void transpose8(__m256 r[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(u0, u4, 0x20), r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
  r[2] = _mm256_permute2f128_ps(u2, u6, 0x20), r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
  r[4] = _mm256_permute2f128_ps(u0, u4, 0x31), r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
  r[6] = _mm256_permute2f128_ps(u2, u6, 0x31), r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}


// Columns [k0, k1) of panel p: out[p][k][j] = x[16 p + j][k] as fp32, zero past the last row.
template <typename T>
void pack_panel(const T* x, int64_t rows, int64_t K, float* out, int64_t p, int64_t k0, int64_t k1) {
  float* o = out + p * K * kPanelRows;
  const int64_t m0 = p * kPanelRows;
  int64_t k = k0;
  for (; k + 8 <= k1; k += 8)
    for (int half = 0; half < 2; ++half) {
      __m256 r[8];
      for (int i = 0; i < 8; ++i) {
        const int64_t m = m0 + half * 8 + i;
        r[i] = m < rows ? load8(x + m * K + k) : _mm256_setzero_ps();
      }
      transpose8(r);
      for (int i = 0; i < 8; ++i) _mm256_store_ps(o + (k + i) * kPanelRows + half * 8, r[i]);
    }
  for (; k < k1; ++k)
    for (int64_t j = 0; j < kPanelRows; ++j) o[k * kPanelRows + j] = m0 + j < rows ? to_float(x[(m0 + j) * K + k]) : 0.f;
}

// The lines of a weight tile to prefetch while the microkernel runs (a gated group's gate tile,
// then its up tile: `then`), `per16` lines after every 16 k steps (one every few steps instead
// made the k loop too short to unroll: a 16-row step ran ~27% slower), then nothing. With one
// panel (4-16 rows) each weight feeds that panel only, and lines brought into L1 two groups ahead
// evicted the panel every group reads, so they go to L2 (T1):
// 16 rows ~15% faster, 8 rows ~25% (Zen 4). With more panels the weights are read once per panel,
// and L1 (T0) is 2-5% ahead at 32-64 rows.
// The same hook requests, one line at a time, the lines of y the group will write, for writing
// (PREFETCHW): `ylines` lines from `y` in each of `yrows` rows `ystride` bytes apart. A step's
// outputs are fresh buffers whose lines are mostly out of the caches; without it each row's first
// store waited for its line (C harness with cold y: 64 rows ~1.5% and 16 rows ~2-3% faster).
struct Prefetch {
  const char* next = nullptr;
  int64_t lines = 0;
  const char* then = nullptr;
  int64_t then_lines = 0;
  int64_t per16 = 0;
  bool to_l1 = true;
  const char* y = nullptr;
  int64_t ystride = 0, yrows = 0, ylines = 0, yline = 0;
};

// The address of the cache line p is in.
inline uintptr_t line_of(const void* p) { return reinterpret_cast<uintptr_t>(p) & ~uintptr_t{63}; }

// PREFETCHW has no intrinsic without -mprfchw; CPUs without it (Intel before Broadwell) run it as a NOP.
inline void prefetch_for_write(const char* p) { asm volatile("prefetchw %0" : : "m"(*p)); }

// acc[i][8 v + l] (+)= sum_{k < len} w[i * ldw + k] * panel[k][8 v + l] for i < R, v < V: R weight
// rows against V vectors of a panel (V = 1: a last panel of at most 8 rows).
template <int R, int V>
inline void panel_kernel(const float* w, int64_t ldw, const float* panel, int64_t len, float* acc, bool accumulate,
                         Prefetch& pf) {
  __m256 a[R][V];
  for (int i = 0; i < R; ++i)
    for (int v = 0; v < V; ++v) a[i][v] = accumulate ? _mm256_load_ps(acc + i * kPanelRows + v * 8) : _mm256_setzero_ps();
  for (int64_t k = 0; k < len;) {
    const int64_t stop = std::min(len, k + 16);
#pragma GCC unroll 4
    for (; k < stop; ++k) {
      __m256 xv[V];
      for (int v = 0; v < V; ++v) xv[v] = _mm256_load_ps(panel + k * kPanelRows + v * 8);
      for (int i = 0; i < R; ++i) {
        const __m256 b = _mm256_broadcast_ss(w + i * ldw + k);
        for (int v = 0; v < V; ++v) a[i][v] = _mm256_fmadd_ps(b, xv[v], a[i][v]);
      }
    }
    if (pf.yrows > 0) {
      prefetch_for_write(pf.y + pf.yline * 64);
      if (++pf.yline == pf.ylines) pf.yline = 0, pf.y += pf.ystride, --pf.yrows;
    }
    for (int64_t j = 0; j < pf.per16 && pf.lines > 0; ++j) {
      if (pf.to_l1)
        _mm_prefetch(pf.next, _MM_HINT_T0);
      else
        _mm_prefetch(pf.next, _MM_HINT_T1);
      pf.next += 64;
      if (--pf.lines == 0 && pf.then_lines > 0) pf.next = pf.then, pf.lines = pf.then_lines, pf.then_lines = 0;
    }
  }
  for (int i = 0; i < R; ++i)
    for (int v = 0; v < V; ++v) _mm256_store_ps(acc + i * kPanelRows + v * 8, a[i][v]);
}

template <int R>
inline void panel_kernel(int vectors, const float* w, int64_t ldw, const float* panel, int64_t len, float* acc,
                         bool accumulate, Prefetch& pf) {
  if (vectors == 2)
    panel_kernel<R, 2>(w, ldw, panel, len, acc, accumulate, pf);
  else
    panel_kernel<R, 1>(w, ldw, panel, len, acc, accumulate, pf);
}

inline void panel_kernel(int64_t r, int vectors, const float* w, int64_t ldw, const float* panel, int64_t len,
                         float* acc, bool accumulate, Prefetch& pf) {
  switch (r) {
    case 6: return panel_kernel<6>(vectors, w, ldw, panel, len, acc, accumulate, pf);
    case 5: return panel_kernel<5>(vectors, w, ldw, panel, len, acc, accumulate, pf);
    case 4: return panel_kernel<4>(vectors, w, ldw, panel, len, acc, accumulate, pf);
    case 3: return panel_kernel<3>(vectors, w, ldw, panel, len, acc, accumulate, pf);
    case 2: return panel_kernel<2>(vectors, w, ldw, panel, len, acc, accumulate, pf);
    default: return panel_kernel<1>(vectors, w, ldw, panel, len, acc, accumulate, pf);
  }
}

// A 64-byte aligned buffer of at least `floats` in v, which only grows: resizing down and up again
// would zero the regrown part on every call (the panels' buffer alternates between K = 768 and
// 2048 within a layer; that memset was ~1.5% of a mixed step).
inline float* align64(std::vector<float>& v, size_t floats) {
  if (v.size() < floats + 16) v.resize(floats + 16);
  return reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(v.data()) + 63) & ~uintptr_t{63});
}

// The groups of one chunk: thread t owns a contiguous share and takes groups from its front, in
// order (the prefetch runs ahead of it); a thread done with its share takes groups from the back of
// the share with the most left. The two cores of a VM do not run at the same speed: with static
// halves one thread waited ~5-20% of a GEMM for the other (harness, 16 and 64 rows).
class Shares {
 public:
  Shares(int64_t groups, int64_t workers) : n_(workers), range_(new std::atomic<uint64_t>[workers]) {
    for (int64_t t = 0; t < n_; ++t) range_[t].store(pack(groups * t / n_, groups * (t + 1) / n_));
  }

  // The next group for thread t, or -1 when none is left; `stolen`: it came from another share.
  int64_t take(int64_t t, bool& stolen) {
    stolen = false;
    if (t < n_) {
      const int64_t own = take_from(t, true);
      if (own >= 0) return own;
    }
    stolen = true;
    for (;;) {
      int64_t victim = -1, most = 0;
      for (int64_t u = 0; u < n_; ++u) {
        const uint64_t r = range_[u].load(std::memory_order_relaxed);
        const int64_t left = int64_t{end(r)} - int64_t{begin(r)};
        if (left > most) victim = u, most = left;
      }
      if (victim < 0) return -1;
      const int64_t g = take_from(victim, false);
      if (g >= 0) return g;  // else its owner or another thief emptied it first: look again
    }
  }

 private:
  static uint64_t pack(uint64_t b, uint64_t e) { return b << 32 | e; }
  static uint32_t begin(uint64_t r) { return static_cast<uint32_t>(r >> 32); }
  static uint32_t end(uint64_t r) { return static_cast<uint32_t>(r); }

  // The first (front) or last group left in share u, or -1 if it is empty.
  int64_t take_from(int64_t u, bool front) {
    uint64_t r = range_[u].load();
    while (begin(r) < end(r))
      if (range_[u].compare_exchange_weak(r, front ? pack(begin(r) + 1, end(r)) : pack(begin(r), end(r) - 1)))
        return front ? begin(r) : end(r) - 1;
    return -1;
  }

  int64_t n_;
  std::unique_ptr<std::atomic<uint64_t>[]> range_;
};

// The weight-row groups of a call's matrices, numbered matrix after matrix: which matrix a group is
// in and its first row there.
template <typename T>
class Groups {
 public:
  Groups(const Linear<T>* mats, int count, int64_t rows_per_group) : mats_(mats), rows_(rows_per_group) {
    for (int i = 0; i < count; ++i) total_ += (mats[i].N + rows_ - 1) / rows_;
  }
  int64_t total() const { return total_; }
  // group g (0 <= g < total) -> its matrix, and the first weight row of the group there
  const Linear<T>& locate(int64_t g, int64_t& n0) const {
    int i = 0;
    for (int64_t n; g >= (n = (mats_[i].N + rows_ - 1) / rows_); g -= n) ++i;
    n0 = g * rows_;
    return mats_[i];
  }

 private:
  const Linear<T>* mats_;
  int64_t rows_, total_ = 0;
};

// silu(g) * u = g * u / (1 + exp(-g)) for 8 lanes. The exp is exp8 (~2 ulp; Inductor's Sleef ~1).
inline __m256 silu_mul(__m256 g, __m256 u) {
  const __m256 one = _mm256_set1_ps(1.0f);
  return _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), g)))), u);
}

// g[i] = silu(g[i]) * u[i] for i < n: gate and up already rounded to T, as two separate linears give them, and the
// product rounded once (as Inductor's fused kernel computes silu(gate) * up).
template <typename T>
void silu_mul_rows(T* g, const T* u, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) store8(g + i, silu_mul(load8(g + i), load8(u + i)));
  for (; i < n; ++i) {
    const float gi = to_float(g[i]);
    store(g + i, gi / (1.0f + std::exp(-gi)) * to_float(u[i]));
  }
}

// A group's sums over the rows [m0, m1) of a chunk to y (N columns), columns [n0, n1):
// tile[p * stride + b * 96 + i * 16 + j] is y[m0 + 16 p + j][n0 + 6 b + i]. A whole fp32 group (12
// columns) is transposed in registers and written as 8 + 4 columns a row (a store that would cross a
// cache line as two of 4); others a value at a time. C harness with cold y, with the prefetch above:
// 64 rows ~2% and 16 rows ~3% faster than a value at a time.
template <typename T>
void write_group(const float* tile, int64_t stride, T* y, int64_t N, int64_t n0, int64_t n1, int64_t m0,
                 int64_t m1) {
  constexpr int64_t kBand = kBandRows * kPanelRows;
  if constexpr (std::is_same_v<T, float>) {
    if (n1 - n0 == kGroupBands * kBandRows) {
      static_assert(kGroupBands == 2 && kBandRows == 6, "the transpose below takes two bands of 6 columns");
      for (int64_t r0 = m0; r0 < m1; r0 += 8) {  // 8 rows: the first half of a panel, then the second
        const float* s = tile + (r0 - m0) / kPanelRows * stride + (r0 - m0) % kPanelRows;
        const float* t = s + kBand;
        __m256 r[8], c[4];  // r: columns 0-7, c: columns 8-11, each over the 8 rows
        for (int i = 0; i < 6; ++i) r[i] = _mm256_load_ps(s + i * kPanelRows);
        r[6] = _mm256_load_ps(t), r[7] = _mm256_load_ps(t + kPanelRows);
        for (int i = 0; i < 4; ++i) c[i] = _mm256_load_ps(t + (2 + i) * kPanelRows);
        transpose8(r);  // now r[j]: row j's columns 0-7
        const __m256 t0 = _mm256_unpacklo_ps(c[0], c[1]), t1 = _mm256_unpackhi_ps(c[0], c[1]);
        const __m256 t2 = _mm256_unpacklo_ps(c[2], c[3]), t3 = _mm256_unpackhi_ps(c[2], c[3]);
        const __m256 u[4] = {_mm256_shuffle_ps(t0, t2, 0x44), _mm256_shuffle_ps(t0, t2, 0xEE),
                             _mm256_shuffle_ps(t1, t3, 0x44), _mm256_shuffle_ps(t1, t3, 0xEE)};  // u[j]: rows j, j + 4
        for (int64_t j = 0; j < std::min<int64_t>(8, m1 - r0); ++j) {
          float* out = y + (r0 + j) * N + n0;
          if ((reinterpret_cast<uintptr_t>(out) & 63) > 32) {
            _mm_storeu_ps(out, _mm256_castps256_ps128(r[j]));
            _mm_storeu_ps(out + 4, _mm256_extractf128_ps(r[j], 1));
          } else {
            _mm256_storeu_ps(out, r[j]);
          }
          _mm_storeu_ps(out + 8, j < 4 ? _mm256_castps256_ps128(u[j]) : _mm256_extractf128_ps(u[j - 4], 1));
        }
      }
      return;
    }
  }
  for (int64_t row = m0; row < m1; ++row) {
    const float* s = tile + (row - m0) / kPanelRows * stride + (row - m0) % kPanelRows;
    for (int64_t n = n0; n < n1; ++n)
      store(y + row * N + n, s[(n - n0) / kBandRows * kBand + (n - n0) % kBandRows * kPanelRows]);
  }
}

// y = x @ w.T for each matrix of the call, through panels. Threads split the weight rows of all
// matrices, in groups of kGroupBands bands, into shares (`Shares`). Per chunk of panels, a group
// runs its bands over every panel of the chunk, K in blocks, with the sums in a per-thread scratch
// tile, then writes its columns of y. Chunks need no barrier between them: each writes its own
// rows of y. One call over several matrices packs x once, forks the threads once, balances the
// shares over all their groups and prefetches from one matrix into the next: bench-125m's mixed
// steps ran ~7% faster with q, k, v and gate, up as two calls instead of five (docs/performance.md).
//
// `gated` (mats: gate, then up, of one N): y = silu(x @ gate.T) * (x @ up.T) into the gate's y. A group
// then runs the same rows of both weights and writes the product: the up projection's output, its
// write-out and the elementwise kernel after it are gone (docs/performance.md).
template <typename T>
void gemm_panels(const T* x, const Linear<T>* mats, int count, int64_t rows, int64_t K, bool gated = false) {
  constexpr int64_t kGroupRows = kGroupBands * kBandRows;
  constexpr int64_t kBand = kBandRows * kPanelRows, kPanelStride = 2 * kGroupBands * kBand;
  const int parts = gated ? 2 : 1;  // weights a group runs: gate and up, or its own matrix's
  const int64_t P = (rows + kPanelRows - 1) / kPanelRows;
  const int last_vectors = rows - (P - 1) * kPanelRows > 8 ? 2 : 1;
  thread_local std::vector<float> packed_storage;
  float* packed = align64(packed_storage, P * K * kPanelRows);
  const Groups<T> all(mats, gated ? 1 : count, kGroupRows);
  const int64_t groups = all.total();
  const int64_t kblocks = (K + kMaxKBlock - 1) / kMaxKBlock, kstep = kblocks == 1 ? K : ((K + kblocks - 1) / kblocks + 7) / 8 * 8;
  constexpr int64_t kPackStep = 64;
  const int64_t pack_parts = (K + kPackStep - 1) / kPackStep;
  const int64_t workers = threads(), chunks = (P + kChunkPanels - 1) / kChunkPanels;
  std::vector<std::unique_ptr<Shares>> shares(chunks);
  for (auto& chunk : shares) chunk = std::make_unique<Shares>(groups, workers);
#pragma omp parallel num_threads(workers)
  {
#pragma omp for schedule(static)
    for (int64_t i = 0; i < P * pack_parts; ++i) {
      const int64_t k0 = (i % pack_parts) * kPackStep;
      pack_panel(x, rows, K, packed, i / pack_parts, k0, std::min(K, k0 + kPackStep));
    }
    // per panel of a chunk: the group's bands (gated: the gate's, then the up's)
    alignas(32) float scratch[kChunkPanels * kPanelStride];
    thread_local std::vector<float> widened_storage;  // bf16: the group's weight tiles as fp32
    float* widened = std::is_same_v<T, float> ? nullptr : align64(widened_storage, parts * kGroupRows * kstep);
    const int64_t me = omp_get_thread_num();
    for (int64_t c0 = 0; c0 < P; c0 += kChunkPanels) {
      const int64_t c1 = std::min(P, c0 + kChunkPanels);
      bool stolen = false;
      for (int64_t g; (g = shares[c0 / kChunkPanels]->take(me, stolen)) >= 0;) {
        int64_t n0;
        const Linear<T>& m = all.locate(g, n0);
        const T* weights[2] = {m.w, gated ? mats[1].w : nullptr};
        const int64_t N = m.N, n1 = std::min(N, n0 + kGroupRows);
        const int64_t bands = (n1 - n0 + kBandRows - 1) / kBandRows;  // the last may have fewer rows
        Prefetch pf;  // the group kAheadGroups further on in this thread's direction, in any matrix
        const int64_t ahead = stolen ? g - kAheadGroups : g + kAheadGroups;
        if (ahead >= 0 && ahead < groups) {
          int64_t a0;
          const Linear<T>& am = all.locate(ahead, a0);
          const int64_t a1 = std::min(am.N, a0 + kGroupRows);
          pf.next = reinterpret_cast<const char*>(am.w + a0 * K);
          pf.lines = ((a1 - a0) * K * static_cast<int64_t>(sizeof(T)) + 63) / 64;
          if (gated) pf.then = reinterpret_cast<const char*>(mats[1].w + a0 * K), pf.then_lines = pf.lines;
          const int64_t steps = (c1 - c0) * bands * K * parts;  // the group's k steps
          pf.per16 = ((pf.lines + pf.then_lines) * 16 + steps - 1) / steps;
          pf.to_l1 = P > 1;
        }
        const int64_t m0 = c0 * kPanelRows, m1 = std::min(rows, c1 * kPanelRows);
        const uintptr_t first = line_of(m.y + m0 * N + n0), last = line_of(m.y + m0 * N + n1 - 1);
        pf.y = reinterpret_cast<const char*>(first);
        pf.ystride = N * static_cast<int64_t>(sizeof(T));
        pf.yrows = m1 - m0;
        pf.ylines = static_cast<int64_t>(last - first) / 64 + 1;
        for (int64_t k0 = 0; k0 < K; k0 += kstep) {
          const int64_t len = std::min(K, k0 + kstep) - k0;
          for (int part = 0; part < parts; ++part) {
            const float* tile;
            int64_t ldw;
            if constexpr (std::is_same_v<T, float>) {
              tile = weights[part] + n0 * K + k0, ldw = K;
            } else {
              float* dst = widened + part * kGroupRows * kstep;
              for (int64_t n = n0; n < n1; ++n) {
                const uint16_t* src = weights[part] + n * K + k0;
                int64_t k = 0;
                for (; k + 8 <= len; k += 8) _mm256_storeu_ps(dst + (n - n0) * kstep + k, load8(src + k));
                for (; k < len; ++k) dst[(n - n0) * kstep + k] = to_float(src[k]);
              }
              tile = dst, ldw = kstep;
            }
            for (int64_t p = c0; p < c1; ++p) {
              const int vectors = p == P - 1 ? last_vectors : 2;
              float* sums = scratch + (p - c0) * kPanelStride + part * kGroupBands * kBand;
              for (int64_t b = 0; b < bands; ++b)
                panel_kernel(std::min<int64_t>(kBandRows, n1 - n0 - b * kBandRows), vectors, tile + b * kBandRows * ldw,
                             ldw, packed + (p * K + k0) * kPanelRows, len, sums + b * kBand, k0 > 0, pf);
            }
          }
        }
        if (gated)  // silu(gate) * up over the gate's sums, both rounded to T first (as two linears give them)
          for (int64_t p = c0; p < c1; ++p)
            for (int64_t i = 0; i < bands * kBand; i += 8) {
              float* gate = scratch + (p - c0) * kPanelStride + i;
              __m256 gv = _mm256_load_ps(gate), uv = _mm256_load_ps(gate + kGroupBands * kBand);
              if constexpr (!std::is_same_v<T, float>) gv = round_bf16(gv), uv = round_bf16(uv);
              _mm256_store_ps(gate, silu_mul(gv, uv));
            }
        write_group<T>(scratch, kPanelStride, m.y, N, n0, n1, m0, m1);
      }
    }
  }
}

// y_i = x @ w_i.T for each matrix of the call: contiguous x (rows, K) and weights. `gated` (gate and up; the up's
// y unused): silu(x @ gate.T) * (x @ up.T) into the gate's y.
template <typename T>
void run(const void* xp, const Linear<T>* mats, int count, int64_t rows, int64_t K, bool gated = false) {
  const T* x = static_cast<const T*>(xp);
  if (rows >= kMinPanelRows) return gemm_panels(x, mats, count, rows, K, gated);
  if (gated) {  // the GEMV streams both weights in one pass; the up's output goes to a buffer here
    thread_local std::vector<T> up;
    up.resize(rows * mats[1].N);
    const Linear<T> both[2] = {mats[0], {mats[1].w, up.data(), mats[1].N}};
    run<T>(xp, both, 2, rows, K);
    return silu_mul_rows(mats[0].y, up.data(), rows * mats[0].N);
  }
  std::vector<float> permuted;
  const float* xf;
  if constexpr (std::is_same_v<T, float>) {
    xf = x;
  } else {
    permuted.resize(rows * K);
    permute16(x, permuted.data(), rows, K);
    xf = permuted.data();
  }
  switch (rows) {
    case 1: gemv<T, 1>(xf, mats, count, K); break;
    case 2: gemv<T, 2>(xf, mats, count, K); break;
    default: gemv<T, 3>(xf, mats, count, K); break;
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

// outs[i] = x @ weights[i].T for `count` weights of one K, each output a new (..., N_i) tensor.
// Contiguous operands (and bf16 up to max_rows_bf16() rows) run graphgen's kernels, all weights in
// one pass; else each weight on its own: strided fp32 through oneDNN's inner product, bf16 through
// ATen's mm. On failure no output is left allocated. `gated` (gate and up of one N): where graphgen's kernels take
// the call, outs[0] = silu(x @ gate.T) * (x @ up.T) and outs[1] stays null; else both linears as above (`gated`
// combines them).
AOTITorchError linears(AtenTensorHandle x, const AtenTensorHandle* weights, int count, AtenTensorHandle* outs,
                       bool gated = false) {
  g_last_error.clear();
  for (int i = 0; i < count; ++i) outs[i] = nullptr;
  int64_t xdim = 0, wdim = 0;
  int64_t *xs = nullptr, *xst = nullptr, *ws[kMaxLinears] = {}, *wst[kMaxLinears] = {};
  int32_t xdtype = 0, wdtype = 0;
  AOTITorchError err = AOTI_TORCH_SUCCESS;
  if ((err = aoti_torch_get_dim(x, &xdim)) || (err = aoti_torch_get_sizes(x, &xs)) ||
      (err = aoti_torch_get_strides(x, &xst)) || (err = aoti_torch_get_dtype(x, &xdtype)))
    return err;
  const bool f32 = xdtype == aoti_torch_dtype_float32(), bf16 = xdtype == aoti_torch_dtype_bfloat16();
  bool dense = true;  // every weight contiguous
  for (int i = 0; i < count; ++i) {
    if ((err = aoti_torch_get_dim(weights[i], &wdim)) || (err = aoti_torch_get_sizes(weights[i], &ws[i])) ||
        (err = aoti_torch_get_strides(weights[i], &wst[i])) || (err = aoti_torch_get_dtype(weights[i], &wdtype)))
      return err;
    if (xdim < 1 || xdim > 8 || wdim != 2 || xs[xdim - 1] != ws[i][1] || wdtype != xdtype || !(f32 || bf16))
      return fail("gemv_linear: x (..., K) with 1-8 dims and weight (N, K), both float32 or both bfloat16, expected");
    dense = dense && contiguous(2, ws[i], wst[i]);
  }
  int64_t rows = 1;
  for (int64_t i = 0; i + 1 < xdim; ++i) rows *= xs[i];
  const int64_t K = xs[xdim - 1];
  const bool fast = rows >= 1 && (f32 || rows <= max_rows_bf16()) && contiguous(xdim, xs, xst);
  if (gated && (count != 2 || ws[0][0] != ws[1][0]))
    return fail("gemv_gated: gate (N, K) and up (N, K) of one shape expected, got N = %lld and %lld",
                static_cast<long long>(ws[0][0]), static_cast<long long>(ws[count - 1][0]));
  const int produced = gated && fast && dense ? 1 : count;  // fused: the up's output is never made
  auto release = [&](AOTITorchError e) {
    for (int i = 0; e && i < count; ++i)
      if (outs[i]) aoti_torch_delete_tensor_object(outs[i]), outs[i] = nullptr;
    return e;
  };
  if (!fast || !dense) {
    if (count > 1) {  // each weight on its own (some may still take the kernel)
      for (int i = 0; i < count && !err; ++i) err = linears(x, weights + i, 1, outs + i);
      return release(err);
    }
    if (f32)  // strided operands: oneDNN's inner product
      return aoti_torch_cpu__linear_pointwise(x, weights[0], nullptr, "none", nullptr, 0, nullptr, outs);
  }
  int64_t sizes[8], strides[8];
  for (int64_t i = 0; i + 1 < xdim; ++i) sizes[i] = xs[i];
  void *xp = nullptr, *wp[kMaxLinears] = {}, *yp[kMaxLinears] = {};
  for (int i = 0; i < count && !err; ++i) {
    err = aoti_torch_get_data_ptr(weights[i], &wp[i]);
    if (err || i >= produced) continue;
    sizes[xdim - 1] = ws[i][0];
    contiguous_strides(xdim, sizes, strides);
    err = aoti_torch_empty_strided(xdim, sizes, strides, xdtype, aoti_torch_device_type_cpu(), 0, &outs[i]);
    if (!err) err = aoti_torch_get_data_ptr(outs[i], &yp[i]);
  }
  if (err || (err = aoti_torch_get_data_ptr(x, &xp))) return release(err);
  if (!fast || !dense) return release(bf16_mm(x, xdim, xs, xst, weights[0], ws[0], wst[0], outs[0], rows));
  if (f32) {
    Linear<float> mats[kMaxLinears];
    for (int i = 0; i < count; ++i) mats[i] = {static_cast<const float*>(wp[i]), static_cast<float*>(yp[i]), ws[i][0]};
    run<float>(xp, mats, count, rows, K, produced < count);
  } else {
    Linear<uint16_t> mats[kMaxLinears];
    for (int i = 0; i < count; ++i)
      mats[i] = {static_cast<const uint16_t*>(wp[i]), static_cast<uint16_t*>(yp[i]), ws[i][0]};
    run<uint16_t>(xp, mats, count, rows, K, produced < count);
  }
  return AOTI_TORCH_SUCCESS;
}

// silu(x @ gate.T) * (x @ up.T) as a new (..., N) tensor: fused in graphgen's kernels where they take the call;
// else the two linears' outputs (`linears`) combined in place, the up's freed.
AOTITorchError gated(AtenTensorHandle x, AtenTensorHandle gate, AtenTensorHandle up, AtenTensorHandle* out) {
  const AtenTensorHandle weights[2] = {gate, up};
  AtenTensorHandle outs[2];
  AOTITorchError err = linears(x, weights, 2, outs, true);
  if (err || !outs[1]) {
    *out = outs[0];
    return err;
  }
  int64_t dims[2], *sizes[2], *strides[2];
  int32_t dtypes[2];
  void *g = nullptr, *u = nullptr;
  if (!(err = read_args(outs, 2, dims, sizes, strides, dtypes)) && !(err = aoti_torch_get_data_ptr(outs[0], &g)) &&
      !(err = aoti_torch_get_data_ptr(outs[1], &u))) {
    if (!contiguous(dims[0], sizes[0], strides[0]) || !contiguous(dims[1], sizes[1], strides[1]))
      err = fail("gemv_gated: the linears' outputs are not contiguous");
  }
  if (!err) {
    int64_t n = 1;
    for (int64_t i = 0; i < dims[0]; ++i) n *= sizes[0][i];
    constexpr int64_t kPart = 1 << 14;  // elements a thread combines at a time
    const bool f32 = dtypes[0] == aoti_torch_dtype_float32();
#pragma omp parallel for num_threads(threads()) if (n >= 4 * kPart)
    for (int64_t i = 0; i < n; i += kPart) {
      if (f32)
        silu_mul_rows(static_cast<float*>(g) + i, static_cast<const float*>(u) + i, std::min(kPart, n - i));
      else
        silu_mul_rows(static_cast<uint16_t*>(g) + i, static_cast<const uint16_t*>(u) + i, std::min(kPart, n - i));
    }
  }
  aoti_torch_delete_tensor_object(outs[1]);
  if (err) aoti_torch_delete_tensor_object(outs[0]), outs[0] = nullptr;
  *out = outs[0];
  return err;
}

}  // namespace

extern "C" {

void graphgen_set_num_threads(int threads) { g_threads.store(threads, std::memory_order_relaxed); }

const char* graphgen_last_error() { return g_last_error.c_str(); }

AOTITorchError aoti_torch_cpu_gemv_linear(AtenTensorHandle x, AtenTensorHandle weight, AtenTensorHandle* ret0) {
  return linears(x, &weight, 1, ret0);
}

// silu(x @ gate.T) * (x @ up.T): a gated MLP's gate and up projections and their product in one pass.
AOTITorchError aoti_torch_cpu_gemv_gated(AtenTensorHandle x, AtenTensorHandle gate, AtenTensorHandle up,
                                         AtenTensorHandle* ret0) {
  return gated(x, gate, up, ret0);
}

// x @ w0.T and x @ w1.T in one pass (a layer's gate and up projections).
AOTITorchError aoti_torch_cpu_gemv_linear2(AtenTensorHandle x, AtenTensorHandle w0, AtenTensorHandle w1,
                                           AtenTensorHandle* ret0, AtenTensorHandle* ret1) {
  const AtenTensorHandle weights[2] = {w0, w1};
  AtenTensorHandle outs[2];
  const AOTITorchError err = linears(x, weights, 2, outs);
  if (!err) *ret0 = outs[0], *ret1 = outs[1];
  return err;
}

// x @ w0.T, x @ w1.T and x @ w2.T in one pass (a layer's q, k and v projections).
AOTITorchError aoti_torch_cpu_gemv_linear3(AtenTensorHandle x, AtenTensorHandle w0, AtenTensorHandle w1,
                                           AtenTensorHandle w2, AtenTensorHandle* ret0, AtenTensorHandle* ret1,
                                           AtenTensorHandle* ret2) {
  const AtenTensorHandle weights[3] = {w0, w1, w2};
  AtenTensorHandle outs[3];
  const AOTITorchError err = linears(x, weights, 3, outs);
  if (!err) *ret0 = outs[0], *ret1 = outs[1], *ret2 = outs[2];
  return err;
}

}  // extern "C"

// graphgen::paged_decode_attention (graphgen/ops/paged_decode.py): one decode token per sequence
// attending over its paged KV cache, on the CPU, as an AOTInductor C shim
// (aoti_torch_cpu_paged_decode_attention) that compiled decode graphs call directly.
//
// Compiled from ATen, the same step gathered every block of the table (visible or not) into a
// transposed copy and ran the gather and softmax parallel over the batch only, one thread at
// batch 1. Here each (sequence, KV head) task reads only its visible positions straight from
// the pool, scores its group of query heads against each key row once, and tasks spread over
// the threads. Scores, softmax and the weighted sum are fp32 for fp32 and bf16 alike.
#include <algorithm>
#include <array>
#include <type_traits>
#include <vector>

#include "kernels.h"

using namespace graphgen;

namespace {

// src[i * stride] for i < D as fp32 into dst.
template <typename T>
inline void widen(const T* src, int64_t stride, int64_t D, float* dst) {
  int64_t i = 0;
  if (stride == 1)
    for (; i + 8 <= D; i += 8) _mm256_storeu_ps(dst + i, load8(src + i));
  for (; i < D; ++i) dst[i] = to_float(src[i * stride]);
}

// acc += p * v for a contiguous row v.
template <typename T>
inline void axpy(float p, const T* v, float* acc, int64_t D) {
  const __m256 a = _mm256_set1_ps(p);
  int64_t i = 0;
  for (; i + 8 <= D; i += 8) _mm256_storeu_ps(acc + i, _mm256_fmadd_ps(a, load8(v + i), _mm256_loadu_ps(acc + i)));
  for (; i < D; ++i) acc[i] += p * to_float(v[i]);
}

// The keys and values of the sequence a thread runs next, requested a few lines at a time while it
// computes the current one (`step`, once per 4 keys scored). The pool is cold: a plain read of a
// step's KV blocks runs at ~20 GB/s here (~45 for one contiguous stream), and a task that starts
// on cold rows waits for them. C harness, 16 sequences of 16-383 positions, cold pool, 12 layers:
// 4.33-4.55 -> 3.59-4.00 ms a step; less again with the pool on huge pages, where the requests do
// not wait on TLB misses (runtime/runner.py, docs/performance.md).
struct ReadAhead {
  std::vector<std::pair<const char*, int64_t>> spans;  // (first byte, 64-byte lines)
  size_t span = 0;
  const char* next = nullptr;
  int64_t left = 0, per_step = 0;

  // Plans the rows of positions < len of the sequence with block-table row `blocks`, whole rows (all
  // KV heads side by side), spread over `steps` calls of step(). Nothing where a block is out of range.
  template <typename T>
  void plan(const T* kc, const T* vc, const int64_t* blocks, int64_t len, int64_t steps, const int64_t* kst,
            const int64_t* vst, int64_t NB, int64_t bs, int64_t row_elems) {
    spans.clear(), span = 0, left = 0, next = nullptr;
    int64_t lines = 0;
    for (int64_t t0 = 0; t0 < len; t0 += bs) {
      const int64_t blk = blocks[t0 / bs];
      if (blk < 0 || blk >= NB) return spans.clear();
      const int64_t n = std::min(bs, len - t0);
      const int64_t kbytes = ((n - 1) * kst[1] + row_elems) * static_cast<int64_t>(sizeof(T));
      const int64_t vbytes = ((n - 1) * vst[1] + row_elems) * static_cast<int64_t>(sizeof(T));
      spans.push_back({reinterpret_cast<const char*>(kc + blk * kst[0]), (kbytes + 63) / 64});
      spans.push_back({reinterpret_cast<const char*>(vc + blk * vst[0]), (vbytes + 63) / 64});
      lines += spans[spans.size() - 2].second + spans.back().second;
    }
    per_step = (lines + steps - 1) / std::max<int64_t>(1, steps);
  }

  void step() {
    for (int64_t n = per_step; n > 0; --n) {
      if (left == 0) {
        if (span == spans.size()) return;
        next = spans[span].first, left = spans[span].second, ++span;
      }
      _mm_prefetch(next, _MM_HINT_T1);
      next += 64, --left;
    }
  }
};

// Strided rows (last-dim stride != 1) widened into one fp32 buffer, with pointers to its rows.
template <typename T>
void widen_rows(const T* const* rows, int64_t len, int64_t stride, int64_t D, std::vector<float>& buf,
                std::vector<const float*>& ptrs) {
  buf.resize(len * D);
  ptrs.resize(len);
  for (int64_t t = 0; t < len; ++t) {
    widen(rows[t], stride, D, buf.data() + t * D);
    ptrs[t] = buf.data() + t * D;
  }
}

// The largest of x[0..n), n >= 1.
inline float max_of(const float* x, int64_t n) {
  __m256 m = _mm256_set1_ps(x[0]);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(x + i));
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  float top = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
  for (; i < n; ++i) top = std::max(top, x[i]);
  return top;
}

// The 4 horizontal sums of a[0..4) as one 128-bit vector.
inline __m128 hsum4(const __m256* a) {
  const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}

// scores[g * len + t] for GC query heads of q (rows of D) against 4 keys from t: 4 GC
// accumulators, each key row loaded once for all GC heads.
template <int GC, typename T>
inline void score4(const float* q, const T* const* rows, int64_t t, int64_t len, int64_t D, float* scores) {
  __m256 a[GC][4];
  for (int g = 0; g < GC; ++g)
    for (int i = 0; i < 4; ++i) a[g][i] = _mm256_setzero_ps();
  for (int64_t d = 0; d < D; d += 8) {
    __m256 kv[4];
    for (int i = 0; i < 4; ++i) kv[i] = load8(rows[t + i] + d);
    for (int g = 0; g < GC; ++g) {
      const __m256 qv = _mm256_loadu_ps(q + g * D + d);
      for (int i = 0; i < 4; ++i) a[g][i] = _mm256_fmadd_ps(qv, kv[i], a[g][i]);
    }
  }
  for (int g = 0; g < GC; ++g) _mm_storeu_ps(scores + g * len + t, hsum4(a[g]));
}

// scores[g * len + t] = q_g . rows[t] for G fp32 query rows q (G, D) and len contiguous key rows.
// Four keys at a time against up to 3 heads (12 accumulators: no FMA latency chain). The pool is
// cold (the weights streamed through the caches since the last step), and one thread's demand
// misses left the memory mostly idle (~11 GB/s of the ~56 a plain read gets here): key rows 16
// ahead are requested into L1 and 48 ahead into L2, and `later` rows (the values, read after the
// softmax; nullptr: none) into L2 alongside. Decode attention at batch 16, cold pool: ~18% faster.
template <typename T>
void score(const float* q, const T* const* rows, int64_t len, int64_t G, int64_t D, float* scores,
           const T* const* later, ReadAhead* ahead) {
  constexpr int64_t kAheadL1 = 16, kAheadL2 = 48;
  int64_t t = 0;
  const int64_t bytes = D * sizeof(T);
  for (int64_t i = 0; i < std::min(kAheadL1, len); ++i) prefetch_row(rows[i], bytes);
  for (int64_t i = kAheadL1; i < std::min(kAheadL2, len); ++i) prefetch_row<_MM_HINT_T1>(rows[i], bytes);
  if (D % 8 == 0)
    for (; t + 4 <= len; t += 4) {
      for (int64_t i = t + kAheadL1; i < std::min(t + kAheadL1 + 4, len); ++i) prefetch_row(rows[i], bytes);
      for (int64_t i = t + kAheadL2; i < std::min(t + kAheadL2 + 4, len); ++i) prefetch_row<_MM_HINT_T1>(rows[i], bytes);
      if (later)
        for (int64_t i = t; i < t + 4; ++i) prefetch_row<_MM_HINT_T1>(later[i], bytes);
      if (ahead) ahead->step();
      for (int64_t g = 0; g < G; g += 3) {
        const float* qg = q + g * D;
        float* sg = scores + g * len;
        switch (std::min<int64_t>(3, G - g)) {
          case 3: score4<3>(qg, rows, t, len, D, sg); break;
          case 2: score4<2>(qg, rows, t, len, D, sg); break;
          default: score4<1>(qg, rows, t, len, D, sg); break;
        }
      }
    }
  for (; t < len; ++t)
    for (int64_t g = 0; g < G; ++g) scores[g * len + t] = dot(q + g * D, rows[t], D);
}

// out[g, d0 .. d0 + 32) = sum_t p[g * len + t] * rows[t][d0 .. d0 + 32) for GC heads: 4 GC
// accumulators, each value row's slice loaded once for all GC heads. The GC weights of a position
// are broadcast first and each slice vector is loaded just before its FMAs: 12 accumulators + 3
// weights + 1 slice fill the 16 ymm registers exactly. Loading the 4 slice vectors first needed
// 17, and GCC kept one accumulator on the stack: a store-to-load chain through every position
// (a 48-token prompt chunk's attention: weigh was 35% of it, single-threaded).
template <int GC, typename T>
inline void weigh32(const float* p, const T* const* rows, int64_t len, int64_t d0, int64_t D, float* out,
                    bool fetch) {
  __m256 a[GC][4];
  for (int g = 0; g < GC; ++g)
    for (int i = 0; i < 4; ++i) a[g][i] = _mm256_setzero_ps();
  for (int64_t t = 0; t < len; ++t) {
    if (fetch && t + 8 < len) prefetch_row(rows[t + 8], D * sizeof(T));
    __m256 pv[GC];
    for (int g = 0; g < GC; ++g) pv[g] = _mm256_set1_ps(p[g * len + t]);
    for (int i = 0; i < 4; ++i) {
      const __m256 v = load8(rows[t] + d0 + 8 * i);
      for (int g = 0; g < GC; ++g) a[g][i] = _mm256_fmadd_ps(pv[g], v, a[g][i]);
    }
  }
  for (int g = 0; g < GC; ++g)
    for (int i = 0; i < 4; ++i) _mm256_storeu_ps(out + g * D + d0 + 8 * i, a[g][i]);
}

// out[g] = sum_t p[g * len + t] * rows[t] for G rows of weights p (G, len): per 32 columns and up
// to 3 heads, 12 accumulators in registers over all positions.
template <typename T>
void weigh(const float* p, const T* const* rows, int64_t len, int64_t G, int64_t D, float* out) {
  const int64_t bytes = D * sizeof(T);
  for (int64_t i = 0; i < std::min<int64_t>(8, len); ++i) prefetch_row(rows[i], bytes);
  if (D % 32 != 0) {
    std::fill(out, out + G * D, 0.0f);
    for (int64_t t = 0; t < len; ++t)
      for (int64_t g = 0; g < G; ++g) axpy(p[g * len + t], rows[t], out + g * D, D);
    return;
  }
  for (int64_t d0 = 0; d0 < D; d0 += 32)
    for (int64_t g = 0; g < G; g += 3) {
      const bool fetch = g == 0 && d0 == 0;  // the first pass over the rows brings them in
      switch (std::min<int64_t>(3, G - g)) {
        case 3: weigh32<3>(p + g * len, rows, len, d0, D, out + g * D, fetch); break;
        case 2: weigh32<2>(p + g * len, rows, len, d0, D, out + g * D, fetch); break;
        default: weigh32<1>(p + g * len, rows, len, d0, D, out + g * D, fetch); break;
      }
    }
}

// Sizes of the inputs and strides (elements) of query and caches, as the shim read them; the block
// table (B, M) and lengths (B,) arrive as contiguous int64.
struct Shapes {
  int64_t B, N, D, NB, bs, Nkv, M;
  const int64_t *qst, *kst, *vst;
};

// krows[t], vrows[t]: KV head h's key and value rows of positions t < len, block by block from
// `blocks` (no division per position). False, with the entry in bad_block, where an entry is
// outside the pool.
template <typename T>
bool row_pointers(const T* kc, const T* vc, const int64_t* blocks, int64_t len, const Shapes& s, int64_t h,
                  std::vector<const T*>& krows, std::vector<const T*>& vrows, int64_t& bad_block) {
  krows.resize(len);
  vrows.resize(len);
  for (int64_t t0 = 0; t0 < len; t0 += s.bs) {
    const int64_t blk = blocks[t0 / s.bs];
    if (blk < 0 || blk >= s.NB) {
      bad_block = blk;
      return false;
    }
    const T* k0 = kc + blk * s.kst[0] + h * s.kst[2];
    const T* v0 = vc + blk * s.vst[0] + h * s.vst[2];
    for (int64_t i = 0, n = std::min(s.bs, len - t0); i < n; ++i) {
      krows[t0 + i] = k0 + i * s.kst[1];
      vrows[t0 + i] = v0 + i * s.vst[1];
    }
  }
  return true;
}

// A thread's buffers, reused across its tasks.
template <typename T>
struct Work {
  std::vector<float> qf, acc, total, scores, rows_f;
  std::vector<const T*> krows, vrows;
  std::vector<const float*> rows_fp;
  explicit Work(int64_t G, int64_t D) : qf(G * D), acc(G * D), total(G) {}
};

// The G query heads of sequence b that read KV head h, over the sequence's len > 0 positions, into
// out. False, with the entry in bad_block, where the sequence's block table points outside the pool.
template <typename T>
bool attend_head(const T* q, const T* kc, const T* vc, const int64_t* blocks, int64_t len, T* out, const Shapes& s,
                 float scale, int64_t b, int64_t h, Work<T>& w, int64_t& bad_block, ReadAhead* ahead) {
  const int64_t G = s.N / s.Nkv, D = s.D;
  T* o = out + (b * s.N + h * G) * D;
  for (int64_t g = 0; g < G; ++g) {
    widen(q + b * s.qst[0] + (h * G + g) * s.qst[1], s.qst[2], D, w.qf.data() + g * D);  // fp32, scaled
    for (int64_t i = 0; i < D; ++i) w.qf[g * D + i] *= scale;
  }
  w.scores.resize(G * len);
  // Row pointers per position (contiguous rows: strided ones are widened into `rows_f` first).
  if (!row_pointers(kc, vc, blocks, len, s, h, w.krows, w.vrows, bad_block)) return false;
  float* scores = w.scores.data();
  const T* const* values_later = s.vst[3] == 1 ? w.vrows.data() : nullptr;  // the rows `weigh` reads
  if (s.kst[3] == 1) {
    score(w.qf.data(), w.krows.data(), len, G, D, scores, values_later, ahead);
  } else {
    widen_rows(w.krows.data(), len, s.kst[3], D, w.rows_f, w.rows_fp);
    score(w.qf.data(), w.rows_fp.data(), len, G, D, scores, static_cast<const float* const*>(nullptr), ahead);
  }
  for (int64_t g = 0; g < G; ++g) {  // softmax numerators in place, and their sum
    float* sg = scores + g * len;
    const float top = max_of(sg, len);
    const __m256 vtop = _mm256_set1_ps(top);
    __m256 vsum = _mm256_setzero_ps();
    int64_t t = 0;
    for (; t + 8 <= len; t += 8) {
      const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(sg + t), vtop));
      _mm256_storeu_ps(sg + t, e);
      vsum = _mm256_add_ps(vsum, e);
    }
    float sum = hsum(vsum);
    for (; t < len; ++t) sum += (sg[t] = std::exp(sg[t] - top));
    w.total[g] = sum;
  }
  if (s.vst[3] == 1) {
    weigh(scores, w.vrows.data(), len, G, D, w.acc.data());
  } else {
    widen_rows(w.vrows.data(), len, s.vst[3], D, w.rows_f, w.rows_fp);
    weigh(scores, w.rows_fp.data(), len, G, D, w.acc.data());
  }
  for (int64_t g = 0; g < G; ++g)
    for (int64_t i = 0; i < D; ++i) store(o + g * D + i, w.acc[g * D + i] / w.total[g]);
  return true;
}

// --- Runs: the tokens of one prompt chunk ------------------------------------------------------
// A mixed step's prompt chunk arrives as one row per token (ops/paged_decode.py, token_rows):
// consecutive rows with the same block table whose lengths grow by one (bottom-right causal). Run
// as rows, every token scores and weighs the same key and value rows again on its own, at ~60
// cycles a position, KV head and token (~2.5x its FMAs). Here a run's query rows for one KV head
// (each token's G heads) go in panels of kPanel lanes, and each key and value row is read once
// per panel: scores and the weighted sum are outer products (6 positions or 6 lanes against 16
// columns, 12 accumulators), the softmax runs across the lanes with each lane's own length.
constexpr int64_t kPanel = 16;
constexpr int64_t kTile = 6;    // rows of an outer product (key positions or lanes): 12 accumulators
constexpr int64_t kMinRun = 4;  // tokens: shorter runs stay rows

// f(std::integral_constant<int, n>{}) for 1 <= n <= kTile: a tile's row count as a template argument.
template <typename F>
inline void with_tile_rows(int64_t n, F f) {
  switch (n) {
    case 6: return f(std::integral_constant<int, 6>{});
    case 5: return f(std::integral_constant<int, 5>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 3: return f(std::integral_constant<int, 3>{});
    case 2: return f(std::integral_constant<int, 2>{});
    default: return f(std::integral_constant<int, 1>{});
  }
}

struct Run {
  int64_t b0, n;  // rows b0 .. b0 + n - 1
};

// The runs of at least kMinRun rows; in_run marks their rows. A row whose length or blocks are
// out of range is never in a run (the row tasks report it).
inline std::vector<Run> find_runs(const int64_t* table, const int64_t* lens, const Shapes& s,
                                  std::vector<char>& in_run) {
  std::vector<Run> runs;
  in_run.assign(s.B, 0);
  const auto blocks = [&](int64_t b) { return (lens[b] + s.bs - 1) / s.bs; };
  const auto valid = [&](int64_t b) {
    if (lens[b] <= 0 || lens[b] > s.M * s.bs) return false;
    const int64_t* row = table + b * s.M;
    return std::all_of(row, row + blocks(b), [&](int64_t blk) { return blk >= 0 && blk < s.NB; });
  };
  for (int64_t b = 0; b < s.B;) {
    int64_t e = b + 1;
    if (valid(b))
      while (e < s.B && lens[e] == lens[e - 1] + 1 && valid(e) &&
             std::equal(table + e * s.M, table + e * s.M + blocks(e), table + b * s.M))
        ++e;
    if (e - b >= kMinRun) {
      runs.push_back({b, e - b});
      std::fill(in_run.begin() + b, in_run.begin() + e, 1);
    }
    b = e;
  }
  return runs;
}

// out[i][0..16) = sum_s b(i, s) * x(s)[0..16) for R <= kTile rows over n steps: 12 accumulators, a
// step's two vectors (x(s, lo, hi)) loaded once for all R rows. The scores (rows: key positions,
// steps: d) and the weighted sum (rows: lanes, steps: positions) are both this outer product.
template <int R, typename Scalar, typename Vectors>
inline void outer16(int64_t n, Scalar b, Vectors x, float* out) {
  __m256 a[R][2];
  for (int i = 0; i < R; ++i) a[i][0] = a[i][1] = _mm256_setzero_ps();
  for (int64_t step = 0; step < n; ++step) {
    __m256 lo, hi;
    x(step, lo, hi);
    for (int i = 0; i < R; ++i) {
      const __m256 w = _mm256_set1_ps(b(i, step));
      a[i][0] = _mm256_fmadd_ps(w, lo, a[i][0]);
      a[i][1] = _mm256_fmadd_ps(w, hi, a[i][1]);
    }
  }
  for (int i = 0; i < R; ++i) {
    _mm256_storeu_ps(out + i * kPanel, a[i][0]);
    _mm256_storeu_ps(out + i * kPanel + 8, a[i][1]);
  }
}

// st[i][j] = sum_d k[i][d] * qt[d][j] for R <= kTile key rows and the panel's 16 lanes.
template <int R, typename T>
inline void score_panel(const float* qt, const T* const* k, int64_t D, float* st) {
  outer16<R>(D, [&](int i, int64_t d) { return to_float(k[i][d]); },
             [&](int64_t d, __m256& lo, __m256& hi) {
               lo = _mm256_loadu_ps(qt + d * kPanel);
               hi = _mm256_loadu_ps(qt + d * kPanel + 8);
             },
             st);
}

// acc[i][0..16) = sum_t p[t][j0 + i] * v[t][d0 .. d0 + 16) for R <= kTile lanes.
template <int R, typename T>
inline void weigh_panel(const float* p, const T* const* v, int64_t len, int64_t j0, int64_t d0, float* acc) {
  outer16<R>(len, [&](int i, int64_t t) { return p[t * kPanel + j0 + i]; },
             [&](int64_t t, __m256& lo, __m256& hi) {
               lo = load8(v[t] + d0);
               hi = load8(v[t] + d0 + 8);
             },
             acc);
}

// st[t][j] for all len key rows, a tile of kTile rows at a time, the rows two tiles ahead
// requested into L1.
template <typename T>
void score_rows(const float* qt, const T* const* k, int64_t len, int64_t D, float* st) {
  for (int64_t t = 0; t < len; t += kTile) {
    for (int64_t i = t + 2 * kTile; i < std::min(t + 3 * kTile, len); ++i) prefetch_row(k[i], D * sizeof(T));
    with_tile_rows(std::min(kTile, len - t),
                   [&](auto r) { score_panel<decltype(r)::value>(qt, k + t, D, st + t * kPanel); });
  }
}

// A run's thread buffers: the panel's queries (D x kPanel), scores then weights (len x kPanel), row
// pointers, one lane group's sums.
template <typename T>
struct PanelWork {
  std::vector<float> qt, st;
  std::vector<const T*> krows, vrows;
  alignas(32) float acc[kTile * kPanel];
};

// Query rows [r0, r0 + kPanel) of run `run` for KV head h (row r: token r / G, head h * G + r % G;
// lanes past the run's rows repeat its last and are not written).
template <typename T>
void attend_panel(const T* q, const T* kc, const T* vc, const int64_t* table, const int64_t* lens, T* out,
                  const Shapes& s, float scale, const Run& run, int64_t h, int64_t r0, PanelWork<T>& w) {
  const int64_t G = s.N / s.Nkv, D = s.D, rows = run.n * G, lanes = std::min(kPanel, rows - r0);
  alignas(32) int32_t len32[kPanel];
  int64_t len = 0;
  w.qt.resize(D * kPanel);
  for (int64_t j = 0; j < kPanel; ++j) {
    const int64_t r = std::min(r0 + j, rows - 1), b = run.b0 + r / G, head = h * G + r % G;
    len32[j] = static_cast<int32_t>(lens[b]);
    len = std::max(len, lens[b]);
    const T* qr = q + b * s.qst[0] + head * s.qst[1];
    for (int64_t d = 0; d < D; ++d) w.qt[d * kPanel + j] = to_float(qr[d * s.qst[2]]) * scale;
  }
  int64_t unused;  // find_runs checked the run's blocks
  row_pointers(kc, vc, table + run.b0 * s.M, len, s, h, w.krows, w.vrows, unused);
  w.st.resize(len * kPanel);
  float* st = w.st.data();
  score_rows(w.qt.data(), w.krows.data(), len, D, st);
  // Softmax per lane over its own positions (t < its length): the maximum, then exp and sum, with
  // positions past a lane's length set to 0 for the weighted sum.
  const __m256 minus_inf = _mm256_set1_ps(-INFINITY);
  const __m256i len_lo = _mm256_load_si256(reinterpret_cast<const __m256i*>(len32));
  const __m256i len_hi = _mm256_load_si256(reinterpret_cast<const __m256i*>(len32 + 8));
  __m256 top[2] = {minus_inf, minus_inf};
  for (int64_t t = 0; t < len; ++t) {
    const __m256i tv = _mm256_set1_epi32(static_cast<int32_t>(t));
    for (int v = 0; v < 2; ++v) {
      const __m256 seen = _mm256_castsi256_ps(_mm256_cmpgt_epi32(v ? len_hi : len_lo, tv));
      top[v] = _mm256_max_ps(top[v], _mm256_blendv_ps(minus_inf, _mm256_loadu_ps(st + t * kPanel + 8 * v), seen));
    }
  }
  alignas(32) float total[kPanel];
  __m256 sum[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
  for (int64_t t = 0; t < len; ++t) {
    const __m256i tv = _mm256_set1_epi32(static_cast<int32_t>(t));
    for (int v = 0; v < 2; ++v) {
      const __m256 seen = _mm256_castsi256_ps(_mm256_cmpgt_epi32(v ? len_hi : len_lo, tv));
      float* p = st + t * kPanel + 8 * v;
      const __m256 e = _mm256_and_ps(exp8(_mm256_sub_ps(_mm256_loadu_ps(p), top[v])), seen);
      _mm256_storeu_ps(p, e);
      sum[v] = _mm256_add_ps(sum[v], e);
    }
  }
  _mm256_store_ps(total, sum[0]);
  _mm256_store_ps(total + 8, sum[1]);
  for (int64_t d0 = 0; d0 < D; d0 += 16)  // the lane groups of one d0 reread its slices of V from L1
    for (int64_t j0 = 0; j0 < lanes; j0 += kTile) {
      const int64_t n = std::min(kTile, lanes - j0);
      with_tile_rows(n, [&](auto r) { weigh_panel<decltype(r)::value>(st, w.vrows.data(), len, j0, d0, w.acc); });
      for (int64_t i = 0; i < n; ++i) {
        const int64_t r = r0 + j0 + i, b = run.b0 + r / G, head = h * G + r % G;
        T* o = out + (b * s.N + head) * D + d0;
        for (int64_t c = 0; c < 16; ++c) store(o + c, w.acc[i * kPanel + c] / total[j0 + i]);
      }
    }
}

// Tasks of one KV head of one sequence, or, with 2 or more sequences per thread and each
// position's KV heads side by side in the pool (BSH), of all KV heads of one sequence, one after
// the other. A head's rows are a slice of every position's row (256 of 1024 bytes for
// bench-125m): a plain read of the same positions ran at ~16 GB/s slice by slice in tasks per
// head, ~30 GB/s row by row. With a sequence's heads in one task, the slices of the heads after
// the first come from L2. C harness, 16 sequences of ~200 positions, cold pool, 12 layers: ~10%
// faster (4.7-5.5 -> 4.1-4.4 ms, alternating runs); a 48-token prompt chunk (warm, its rows all one
// sequence's) level. Requesting whole rows into L2 ahead of the first head was no better.
// Runs of a prompt chunk's tokens (`find_runs`; D-contiguous caches, D a multiple of 16) are panel
// tasks (`attend_panel`) before the row tasks of the other rows.
// Threads claim tasks one ahead from a shared counter (a dynamic schedule that lets a thread know
// its next task): a thread running a whole sequence reads the next one's rows in (`ReadAhead`).
template <typename T>
AOTITorchError attend(const T* q, const T* kc, const T* vc, const int64_t* table, const int64_t* lens, T* out,
                      const Shapes& s, float scale) {
  const int64_t G = s.N / s.Nkv, D = s.D;
  std::vector<char> in_run;
  const std::vector<Run> runs = s.kst[3] == 1 && s.vst[3] == 1 && D % 16 == 0 ? find_runs(table, lens, s, in_run)
                                                                                : std::vector<Run>{};
  std::vector<int64_t> rows;  // the rows outside runs
  for (int64_t b = 0; b < s.B; ++b)
    if (runs.empty() || !in_run[b]) rows.push_back(b);
  // Longest first: the threads take tasks in order, so the last ones to start are the shortest
  // and neither waits long for the other at the end (C harness, 16 sequences of 16-383 positions,
  // cold pool: 3.69-3.84 -> 3.53-3.67 ms a step of 12 layers, medians of 25).
  std::stable_sort(rows.begin(), rows.end(), [&](int64_t a, int64_t b) { return lens[a] > lens[b]; });
  std::vector<std::array<int64_t, 3>> panels;  // (run, KV head, first query row)
  for (int64_t r = 0; r < static_cast<int64_t>(runs.size()); ++r)
    for (int64_t h = 0; h < s.Nkv; ++h)
      for (int64_t r0 = 0; r0 < runs[r].n * G; r0 += kPanel) panels.push_back({r, h, r0});
  const int64_t R = rows.size(), P = panels.size();
  const bool side_by_side = s.kst[3] == 1 && s.vst[3] == 1 && s.kst[2] == D && s.vst[2] == D;
  const int64_t heads = side_by_side && R >= 2 * threads() ? s.Nkv : 1;  // KV heads per row task
  const int64_t tasks = P + R * (s.Nkv / heads);
  std::atomic<bool> any_bad_block{false};
  std::atomic<int64_t> bad_block{0}, bad_len{-1};
  const int64_t tasks_per_row = s.Nkv / heads;
  std::atomic<int64_t> claimed{0};
#pragma omp parallel num_threads(std::max<int64_t>(1, std::min<int64_t>(threads(), tasks)))
  {
    Work<T> work(G, D);
    PanelWork<T> panel_work;
    ReadAhead ahead;
    for (int64_t task = claimed.fetch_add(1), following; task < tasks; task = following) {
      following = claimed.fetch_add(1);
      if (task < P) {
        const auto& [r, h, r0] = panels[task];
        attend_panel(q, kc, vc, table, lens, out, s, scale, runs[r], h, r0, panel_work);
        continue;
      }
      const int64_t row = (task - P) / tasks_per_row, b = rows[row], h0 = (task - P) % tasks_per_row * heads;
      const int64_t len = lens[b];
      if (len <= 0 || len > s.M * s.bs) {
        if (len > s.M * s.bs) bad_len = b;
        T* o = out + (b * s.N + h0 * G) * D;
        for (int64_t i = 0; i < heads * G * D; ++i) store(o + i, 0.0f);
        continue;
      }
      ReadAhead* next = nullptr;
      if (heads == s.Nkv && following < tasks) {  // whole sequences: the next one's rows, all heads
        const int64_t nb = rows[(following - P) / tasks_per_row];
        if (lens[nb] > 0 && lens[nb] <= s.M * s.bs) {
          ahead.plan(kc, vc, table + nb * s.M, lens[nb], heads * std::max<int64_t>(1, len / 4), s.kst, s.vst, s.NB,
                     s.bs, s.Nkv * D);
          next = &ahead;
        }
      }
      for (int64_t h = h0; h < h0 + heads; ++h) {
        int64_t bad;
        if (!attend_head(q, kc, vc, table + b * s.M, len, out, s, scale, b, h, work, bad, next)) {
          bad_block = bad;
          any_bad_block = true;
          break;
        }
      }
    }
  }
  if (any_bad_block.load() || bad_len.load() != -1) {
    if (bad_len.load() != -1)
      return fail("paged_decode_attention: sequence %lld's length exceeds its block table (%lld blocks of %lld)",
                  static_cast<long long>(bad_len.load()), static_cast<long long>(s.M), static_cast<long long>(s.bs));
    return fail("paged_decode_attention: block table entry %lld is outside the cache's %lld blocks",
                static_cast<long long>(bad_block.load()), static_cast<long long>(s.NB));
  }
  return AOTI_TORCH_SUCCESS;
}

}  // namespace

extern "C" {

// query (B, N, D); key_cache, value_cache (NB, block_size, Nkv, D), any strides; block_table
// (B, M) and seq_lens (B,) int32 or int64 -> (B, N, D) contiguous, query's dtype. Query head n
// reads KV head n / (N / Nkv); sequence b sees positions < seq_lens[b]; a row with length 0 is 0.
AOTITorchError aoti_torch_cpu_paged_decode_attention(AtenTensorHandle query, AtenTensorHandle key_cache,
                                                     AtenTensorHandle value_cache, AtenTensorHandle block_table,
                                                     AtenTensorHandle seq_lens, double scale, AtenTensorHandle* ret0) {
  g_last_error.clear();
  AtenTensorHandle handles[5] = {query, key_cache, value_cache, block_table, seq_lens};
  const int64_t want_dim[5] = {3, 4, 4, 2, 1};
  int64_t dims[5], *sizes[5], *strides[5];
  int32_t dtypes[5];
  AOTITorchError err = read_args(handles, 5, dims, sizes, strides, dtypes);
  if (err) return err;
  for (int i = 0; i < 5; ++i)
    if (dims[i] != want_dim[i])
      return fail("paged_decode_attention: query (B, N, D), caches (NB, block_size, Nkv, D), block_table (B, M), "
                  "seq_lens (B,) expected; argument %d has %lld dims", i, static_cast<long long>(dims[i]));
  const int64_t *qs = sizes[0], *ks = sizes[1];
  const Shapes s{qs[0], qs[1], qs[2], ks[0], ks[1], ks[2], sizes[3][1], strides[0], strides[1], strides[2]};
  const bool f32 = dtypes[0] == aoti_torch_dtype_float32(), bf16 = dtypes[0] == aoti_torch_dtype_bfloat16();
  if (!(f32 || bf16) || dtypes[1] != dtypes[0] || dtypes[2] != dtypes[0])
    return fail("paged_decode_attention: query and caches must all be float32 or all bfloat16");
  for (int d = 0; d < 4; ++d)
    if (sizes[2][d] != ks[d]) return fail("paged_decode_attention: key_cache and value_cache shapes differ");
  if (ks[3] != s.D || s.Nkv < 1 || s.N % s.Nkv != 0 || sizes[3][0] != s.B || sizes[4][0] != s.B)
    return fail("paged_decode_attention: query (%lld, %lld, %lld) does not fit caches (.., .., %lld, %lld), "
                "block_table (%lld, ..), seq_lens (%lld,)", static_cast<long long>(s.B), static_cast<long long>(s.N),
                static_cast<long long>(s.D), static_cast<long long>(s.Nkv), static_cast<long long>(ks[3]),
                static_cast<long long>(sizes[3][0]), static_cast<long long>(sizes[4][0]));
  std::vector<int64_t> table, lens;
  const char* op = "paged_decode_attention";
  if ((err = read_ints(block_table, s.B * s.M, sizes[3], strides[3], 2, table, op, "block_table")) ||
      (err = read_ints(seq_lens, s.B, sizes[4], strides[4], 1, lens, op, "seq_lens")))
    return err;
  int64_t out_strides[3];
  contiguous_strides(3, qs, out_strides);
  if ((err = aoti_torch_empty_strided(3, qs, out_strides, dtypes[0], aoti_torch_device_type_cpu(), 0, ret0))) return err;
  void *q = nullptr, *k = nullptr, *v = nullptr, *o = nullptr;
  if ((err = aoti_torch_get_data_ptr(query, &q)) || (err = aoti_torch_get_data_ptr(key_cache, &k)) ||
      (err = aoti_torch_get_data_ptr(value_cache, &v)) || (err = aoti_torch_get_data_ptr(*ret0, &o)))
    return err;
  const float sc = static_cast<float>(scale);
  if (f32)
    err = attend(static_cast<const float*>(q), static_cast<const float*>(k), static_cast<const float*>(v), table.data(),
                 lens.data(), static_cast<float*>(o), s, sc);
  else
    err = attend(static_cast<const uint16_t*>(q), static_cast<const uint16_t*>(k), static_cast<const uint16_t*>(v),
                 table.data(), lens.data(), static_cast<uint16_t*>(o), s, sc);
  if (err) {  // the output handle is ours to free on failure
    aoti_torch_delete_tensor_object(*ret0);
    *ret0 = nullptr;
  }
  return err;
}

}  // extern "C"

// graphgen::packed_causal_attention (graphgen/ops/packed_causal.py): causal attention within each
// sequence of a packed prefill (TND), on the CPU, as an AOTInductor C shim
// (aoti_torch_cpu_packed_causal_attention) that compiled prefill graphs call directly.
//
// As one scaled_dot_product_attention over all T packed tokens with a (T, T) block-diagonal mask,
// a prefill of 12 sequences of ~160 tokens computed (and masked) 12 times the scores it needed:
// ~110 ms per layer of a 125M model here, against ~13 ms one sequence at a time. Here each
// sequence runs ATen's CPU flash attention (causal, grouped KV heads) on strided views of its
// tokens, and its output is copied into place; tokens past the last end are zeros.
#include <torch/csrc/inductor/aoti_torch/c/shim_cpu.h>
#include <torch/csrc/inductor/aoti_torch/generated/c_shim_cpu.h>

#include "kernels.h"

using namespace graphgen;

namespace {

// One sequence's tensor handles (its views, the attention's outputs), freed when it goes out of scope.
struct Handles {
  AtenTensorHandle q = nullptr, k = nullptr, v = nullptr, o = nullptr, attn = nullptr, logsumexp = nullptr;
  ~Handles() {
    for (AtenTensorHandle h : {q, k, v, o, attn, logsumexp})
      if (h) aoti_torch_delete_tensor_object(h);
  }
};

// The (1, heads, len, D) view of tokens [start, start + len) of a (T, heads, D) tensor.
AOTITorchError segment(AtenTensorHandle t, const int64_t* sizes, const int64_t* strides, int64_t start, int64_t len,
                       AtenTensorHandle* view) {
  const int64_t view_sizes[4] = {1, sizes[1], len, sizes[2]};
  const int64_t view_strides[4] = {sizes[0] * strides[0], strides[1], strides[0], strides[2]};
  return aoti_torch__reinterpret_tensor(t, 4, view_sizes, view_strides, start * strides[0], view);  // added to t's own offset
}

}  // namespace

extern "C" {

// query (T, N, D), key and value (T, Nkv, D) in any strides, N a multiple of Nkv; cu_seq_lens (K,)
// int32 or int64, non-decreasing cumulative ends <= T -> (T, N, D) contiguous, query's dtype.
// Token i of sequence s (cu_seq_lens[s-1] <= i < cu_seq_lens[s]) sees the tokens j of its own
// sequence with j <= i, scaled by `scale`; tokens from cu_seq_lens[K-1] on are zeros.
AOTITorchError aoti_torch_cpu_packed_causal_attention(AtenTensorHandle query, AtenTensorHandle key,
                                                      AtenTensorHandle value, AtenTensorHandle cu_seq_lens,
                                                      double scale, AtenTensorHandle* ret0) {
  g_last_error.clear();
  AtenTensorHandle handles[4] = {query, key, value, cu_seq_lens};
  const int64_t want_dim[4] = {3, 3, 3, 1};
  int64_t dims[4], *sizes[4], *strides[4];
  int32_t dtypes[4];
  AOTITorchError err = read_args(handles, 4, dims, sizes, strides, dtypes);
  if (err) return err;
  for (int i = 0; i < 4; ++i)
    if (dims[i] != want_dim[i])
      return fail("packed_causal_attention: query (T, N, D), key and value (T, Nkv, D), cu_seq_lens (K,) "
                  "expected; argument %d has %lld dims", i, static_cast<long long>(dims[i]));
  const int64_t *qs = sizes[0], *ks = sizes[1], *vs = sizes[2];
  const int64_t T = qs[0], N = qs[1], D = qs[2], Nkv = ks[1];
  if (ks[0] != T || vs[0] != T || vs[1] != Nkv || ks[2] != D || vs[2] != D || Nkv < 1 || N % Nkv != 0)
    return fail("packed_causal_attention: query (%lld, %lld, %lld) does not fit key (%lld, %lld, %lld) and value "
                "(%lld, %lld, %lld)", static_cast<long long>(T), static_cast<long long>(N),
                static_cast<long long>(D), static_cast<long long>(ks[0]), static_cast<long long>(ks[1]),
                static_cast<long long>(ks[2]), static_cast<long long>(vs[0]), static_cast<long long>(vs[1]),
                static_cast<long long>(vs[2]));
  const bool f32 = dtypes[0] == aoti_torch_dtype_float32(), bf16 = dtypes[0] == aoti_torch_dtype_bfloat16();
  if (!(f32 || bf16) || dtypes[1] != dtypes[0] || dtypes[2] != dtypes[0])
    return fail("packed_causal_attention: query, key and value must all be float32 or all bfloat16");
  std::vector<int64_t> ends;
  if ((err = read_ints(cu_seq_lens, sizes[3][0], sizes[3], strides[3], 1, ends, "packed_causal_attention",
                       "cu_seq_lens")))
    return err;
  for (int64_t s = 0; s < static_cast<int64_t>(ends.size()); ++s) {
    if (ends[s] < (s ? ends[s - 1] : 0) || ends[s] > T)
      return fail("packed_causal_attention: cu_seq_lens must be non-decreasing ends within the %lld tokens; "
                  "entry %lld is %lld", static_cast<long long>(T), static_cast<long long>(s),
                  static_cast<long long>(ends[s]));
  }

  int64_t out_strides[3];
  contiguous_strides(3, qs, out_strides);
  if ((err = aoti_torch_empty_strided(3, qs, out_strides, dtypes[0], aoti_torch_device_type_cpu(), 0, ret0)))
    return err;
  const int64_t done = ends.empty() ? 0 : ends.back();
  if (done < T) {  // the padding past the last sequence: zeros
    void* out_data = nullptr;
    if ((err = aoti_torch_get_data_ptr(*ret0, &out_data))) return err;
    const int64_t row = N * D * (f32 ? 4 : 2);
    std::memset(static_cast<char*>(out_data) + done * row, 0, (T - done) * row);
  }
  for (int64_t s = 0, start = 0; s < static_cast<int64_t>(ends.size()); start = ends[s++]) {
    const int64_t len = ends[s] - start;
    if (len == 0) continue;
    Handles h;
    double sc = scale;
    if ((err = segment(query, qs, strides[0], start, len, &h.q)) ||
        (err = segment(key, ks, strides[1], start, len, &h.k)) ||
        (err = segment(value, vs, strides[2], start, len, &h.v)) ||
        (err = segment(*ret0, qs, out_strides, start, len, &h.o)) ||
        (err = aoti_torch_cpu__scaled_dot_product_flash_attention_for_cpu(h.q, h.k, h.v, 0.0, 1, nullptr, &sc, &h.attn,
                                                                         &h.logsumexp)) ||
        (err = aoti_torch_copy_(h.o, h.attn, 0))) {
      aoti_torch_delete_tensor_object(*ret0);
      *ret0 = nullptr;
      return fail("packed_causal_attention: ATen's flash attention failed on sequence %lld (tokens %lld-%lld)",
                  static_cast<long long>(s), static_cast<long long>(start), static_cast<long long>(ends[s] - 1));
    }
  }
  return AOTI_TORCH_SUCCESS;
}

}  // extern "C"

"""graphgen.ops: the seed document's NPU attention ops with torch_npu's exact schemas.

Importing this package registers every op under the `graphgen` torch.library namespace
(`torch.ops.graphgen.<name>`): a reference kernel for CPU/CUDA, a fake kernel for tracing, and
input checks that turn the device's constraints into clear errors. `emulate()` registers the same
ops as `torch.ops.npu.*` where torch_npu is absent. This package imports nothing else of graphgen.
"""
from . import canonical  # noqa: F401  (graphgen::attention, the capture-side node)
from . import incre_flash_attention, prompt_flash_attention, fused_infer_attention_score  # noqa: F401
from . import fusion_attention  # noqa: F401,E402  (npu_fusion_attention + its grad op)
from . import advance_step, kv_cache  # noqa: F401,E402  (advance step; KV writes + graphgen::kv_cache_scatter_)
from . import paged_portable  # noqa: F401,E402  (graph-only paged attention with softcap/sinks, cpu/cuda)
from . import gemv_linear, packed_causal, paged_decode  # noqa: F401,E402  (CPU kernels compiled graphs call: ops/cpu_kernels.py)
from . import greedy_head  # noqa: F401,E402  (the runtime's greedy argmax over an LM head)
from .emulate import emulate  # noqa: F401,E402  (torch.ops.npu.* + a torch_npu-like module on CPU)

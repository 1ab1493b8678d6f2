"""graphgen.runtime: serve a compiled artifact with paged KV-cache decoding.

One idea per module: params (SamplingParams, RequestOutput), sequence (one request's state),
block_manager (the KV block pool and prefix cache), scheduler (continuous batching, preemption),
sampler (logits -> tokens, stop strings). Never imports graphgen.capture or graphgen.passes.
"""
from .params import RequestOutput, SamplingParams

__all__ = ["RequestOutput", "SamplingParams"]

"""graphgen.passes: small FX passes, each `GraphModule -> (GraphModule, record of what it matched)`.

canonicalize (fallback: aten SDPA -> canonical graphgen.attention), paged_attention (canonical
node -> KV-cache write + PFA/IFA/FIA), sampled_rows (the logits' row gather moved up to the last
attention), rotary (position-only cos/sin -> table lookups; cpu/cuda builds), lint (graph-mode
constraint report); subgraph holds what canonicalize and rotary share.
Import the pass modules directly; this package imports none of them, so each can be used and
tested alone.
"""

"""graphgen.capture: HF model -> ExportedProgram with one canonical `graphgen::attention` per layer.

load (local dir, config + seed, or hub cache) -> interface (the "graphgen" attention function and
its no-mask function, registered on import) -> export (non-strict torch.export with explicit
dynamic batch and sequence).
"""
from .export import (  # noqa: F401
    AttentionSite,
    CaptureError,
    CaptureRecord,
    attention_sites,
    capture,
    max_abs_error_vs_eager,
)
from .interface import NAME as ATTN_IMPLEMENTATION  # noqa: F401
from .interface import UnsupportedAttention  # noqa: F401
from .load import ModelLoadError, load_model  # noqa: F401
from .tokenizer import build_byte_tokenizer, save_byte_tokenizer  # noqa: F401

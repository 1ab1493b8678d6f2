"""graphgen.capture: HF model -> ExportedProgram with one canonical `graphgen::attention` per layer.

load (local dir, config + seed, or hub cache) -> interface (the "graphgen" attention function and
its no-mask function) -> export (non-strict torch.export with explicit dynamic batch and sequence).
"""
from .interface import NAME as ATTN_IMPLEMENTATION  # noqa: F401  (registers "graphgen" on import)

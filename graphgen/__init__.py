"""graphgen: HuggingFace causal LM -> compiled, packaged, paged-decoding deployment on Ascend NPUs."""
from __future__ import annotations

__version__ = "0.1.0"

from . import ops  # noqa: F401,E402  (registers torch.ops.graphgen.*)

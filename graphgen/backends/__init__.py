"""Backends turn a paged ExportedProgram into a file in the artifact, and load it back.

Each backend module has `FORMAT`, `save(ep, path)` and `load(path, constants) -> callable`; the
callable takes the graph's inputs positionally (manifest order) and returns the logits.
`constants` maps the graph's parameter/buffer names to tensors, so weights live once in the
artifact's HF checkpoint rather than inside every graph. A backend may also have
`prepare(device, say) -> wait`: the compiler calls it before loading the model (`say(stage, detail)`
reports progress), and `wait()` before the first graph compiles, so one-time setup overlaps the
model's load and export.
"""
from __future__ import annotations

from types import ModuleType


def backend_module(name: str) -> ModuleType:
    """The module for a recipe's `compile.backend` (or a manifest's graph `format`)."""
    if name in ("inductor", "aoti"):
        from . import inductor

        return inductor
    if name in ("eager", "exported"):
        from . import eager

        return eager
    if name == "torchair":
        from . import torchair  # imports torch_npu/torchair only when it compiles or loads

        return torchair
    raise ValueError(f"unknown backend {name!r}; use inductor, eager or torchair")

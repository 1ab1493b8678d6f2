"""Inductor backend (cpu/cuda): each paged graph becomes an AOTInductor `.pt2` package.

Weights are not packaged into the compiled library (`package_constants_in_so=False`): the runtime
hands them over from the artifact's HF checkpoint with `load_constants(user_managed=True)`, so both
graphs share one copy in memory and on disk.

Before compiling, the serving calls of the attention ops (paged decode, packed causal prefill) are
replaced by their ATen decompositions (graphgen/ops/decompositions.py), so a decode step runs as
compiled code end to end instead of calling back into the Python reference kernels.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.utils._pytree as pytree

from ..ops.decompositions import serving_decompositions

FORMAT = "aoti"
INDUCTOR_CONFIGS = {
    "aot_inductor.package_constants_in_so": False,
}


def save(ep: torch.export.ExportedProgram, path: Path) -> list[str]:
    """Compile `ep` to an AOTInductor package at `path`; return the constant names it expects."""
    ep = ep.run_decompositions(serving_decompositions())
    torch._inductor.aoti_compile_and_package(ep, package_path=str(path), inductor_configs=dict(INDUCTOR_CONFIGS))
    return list(torch._inductor.aoti_load_package(str(path)).get_constant_fqns())


class CompiledGraph:
    """A loaded package called with positional tensors. AOTICompiledModel.__call__ parses its call
    spec (JSON) and pytree-flattens on every call; here the output spec is parsed once and the
    inputs go straight to the loader, which matters for a decode step of a fraction of a ms."""

    def __init__(self, compiled):
        self.compiled = compiled
        self._run = compiled.loader.boxed_run
        self._out_spec = pytree.treespec_loads(compiled.loader.get_call_spec()[1])

    def __call__(self, *inputs: torch.Tensor):
        return pytree.tree_unflatten(self._run(list(inputs)), self._out_spec)


def load(path: Path, constants: dict[str, torch.Tensor]) -> CompiledGraph:
    """Load the package and bind its constants (shared with the caller, not copied)."""
    runner = torch._inductor.aoti_load_package(str(path))
    expected = set(runner.get_constant_fqns())
    missing = sorted(expected - constants.keys())
    if missing:
        raise RuntimeError(f"{path}: graph constants missing from the artifact's weights: {missing[:5]}")
    runner.load_constants({k: constants[k] for k in expected}, check_full_update=True, user_managed=True)
    return CompiledGraph(runner)

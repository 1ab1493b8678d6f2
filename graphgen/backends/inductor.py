"""Inductor backend (cpu/cuda): each paged graph becomes an AOTInductor `.pt2` package.

Weights are not packaged into the compiled library (`package_constants_in_so=False`): the runtime
hands them over from the artifact's HF checkpoint with `load_constants(user_managed=True)`, so both
graphs share one copy in memory and on disk.
"""
from __future__ import annotations

from pathlib import Path

import torch

FORMAT = "aoti"


def save(ep: torch.export.ExportedProgram, path: Path) -> list[str]:
    """Compile `ep` to an AOTInductor package at `path`; return the constant names it expects."""
    torch._inductor.aoti_compile_and_package(
        ep,
        package_path=str(path),
        inductor_configs={"aot_inductor.package_constants_in_so": False},
    )
    return list(torch._inductor.aoti_load_package(str(path)).get_constant_fqns())


def load(path: Path, constants: dict[str, torch.Tensor]):
    """Load the package and bind its constants (shared with the caller, not copied)."""
    runner = torch._inductor.aoti_load_package(str(path))
    expected = set(runner.get_constant_fqns())
    missing = sorted(expected - constants.keys())
    if missing:
        raise RuntimeError(f"{path}: graph constants missing from the artifact's weights: {missing[:5]}")
    runner.load_constants({k: constants[k] for k in expected}, check_full_update=True, user_managed=True)
    return runner

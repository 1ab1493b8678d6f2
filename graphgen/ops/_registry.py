"""One place where graphgen ops are defined, so `emulate()` can mirror them as torch.ops.npu.*."""
from __future__ import annotations

import torch

# "name" or "name.overload" -> schema text (without the name), for the ops torch_npu also has.
NPU_SCHEMAS: dict[str, str] = {}


def define(name: str, schema: str, *, npu: bool = True) -> str:
    """Define `graphgen::<name>` with `schema` ("(Tensor query, ...) -> Tensor"); record it for the
    npu mirror when torch_npu has the same op (npu=False for graph-only forms such as the
    tensor-length overloads). Returns the qualified name for torch.library.impl/register_fake."""
    qualname = f"graphgen::{name}"
    torch.library.define(qualname, schema)
    if npu:
        NPU_SCHEMAS[name] = schema
    return qualname

"""`emulate()`: torch.ops.npu.* and a `torch_npu`-like module where torch_npu is absent.

Every op recorded in `_registry.NPU_SCHEMAS` at call time (import graphgen.ops first) is defined as
`torch.ops.npu.<name>` with the identical schema. Its kernel is CompositeExplicitAutograd and
forwards to `torch.ops.graphgen.<name>`, so in a traced graph the npu node stays one opaque node
(the graph an NPU lowering produces runs on CPU as is); its fake kernel forwards too, and the
training op gets the same autograd formula (backward through `npu.npu_fusion_attention_grad`).

    torch_npu = graphgen.ops.emulate()
    out = torch_npu.npu_incre_flash_attention(q, k, v, num_heads=8, input_layout="BSH")

Where the real torch_npu is importable, emulate() registers nothing, warns that it does so, and
returns the real module. Calling it again is harmless: ops already mirrored are kept, ops
registered since are added, and the same module object is returned. The module is not put in
sys.modules: `import torch_npu` keeps failing on CPU, so nothing mistakes the emulation for a device.
"""
from __future__ import annotations

import importlib
import types
import warnings

import torch

from . import _registry
from . import fusion_attention as _fusion_attention

_lib: torch.library.Library | None = None
_mirrored: set[str] = set()
_module: types.ModuleType | None = None


def _real_torch_npu() -> types.ModuleType | None:
    try:
        return importlib.import_module("torch_npu")
    except ImportError:
        return None


def _graphgen_op(name: str):
    base, _, overload = name.partition(".")
    packet = getattr(torch.ops.graphgen, base)
    return getattr(packet, overload or "default")


def _mirror(name: str, schema: str) -> None:
    target = _graphgen_op(name)

    def kernel(*args, **kwargs):
        return target(*args, **kwargs)

    def fake(*args, **kwargs):
        return target(*args, **kwargs)  # under a fake mode this runs graphgen's fake kernel

    _lib.define(f"{name}{schema}")
    _lib.impl(name, kernel, "CompositeExplicitAutograd")
    torch.library.register_fake(f"npu::{name}", fake, lib=_lib)
    if name == _fusion_attention.OP:
        _fusion_attention.register_autograd(f"npu::{name}", lambda *a, **k: torch.ops.npu.npu_fusion_attention_grad(*a, **k))


def _python_api(name: str):
    base, _, overload = name.partition(".")

    def call(*args, **kwargs):
        op = getattr(torch.ops.npu, base)
        return (getattr(op, overload) if overload else op)(*args, **kwargs)

    call.__name__ = base
    call.__doc__ = f"torch_npu.{base}{_registry.NPU_SCHEMAS[name]} (graphgen emulation on {torch.__version__})"
    return call


def emulate() -> types.ModuleType:
    """Register torch.ops.npu.* for every graphgen op torch_npu also has and return a module exposing
    them as torch_npu does (`npu_fusion_attention`, `npu_incre_flash_attention`, ...). Returns the
    real torch_npu unchanged when it is importable."""
    global _lib, _module
    real = _real_torch_npu()
    if real is not None:
        warnings.warn("graphgen.ops.emulate(): torch_npu is installed; using the real torch_npu and "
                      "registering no emulated npu ops", stacklevel=2)
        return real
    if _lib is None:
        _lib = torch.library.Library("npu", "FRAGMENT")
        _module = types.ModuleType("torch_npu", "graphgen's CPU emulation of torch_npu's attention ops")
        _module.__graphgen_emulated__ = True
    for name, schema in list(_registry.NPU_SCHEMAS.items()):
        if name not in _mirrored:
            _mirror(name, schema)
            _mirrored.add(name)
        setattr(_module, name.partition(".")[0], _python_api(name))
    return _module

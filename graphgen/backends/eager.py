"""Eager backend (debugging and reference): the paged ExportedProgram saved as is, run uncompiled.

The exported program carries its own copy of the weights (torch.export.save has no way to leave
them out); `load` rebinds them to the artifact's checkpoint tensors so behaviour matches inductor.
"""
from __future__ import annotations

from pathlib import Path

import torch

FORMAT = "exported"


def save(ep: torch.export.ExportedProgram, path: Path) -> list[str]:
    torch.export.save(ep, str(path))
    return list(ep.state_dict.keys()) + list(ep.constants.keys())


def load(path: Path, constants: dict[str, torch.Tensor]):
    ep = torch.export.load(str(path))
    module = ep.module()
    module._forward_pre_hooks.clear()  # inputs are positional, in manifest order
    own = dict(module.named_parameters(remove_duplicate=False))
    own.update(module.named_buffers(remove_duplicate=False))
    for name, tensor in constants.items():
        if name in own and own[name].shape == tensor.shape:
            own[name].data = tensor
    return module

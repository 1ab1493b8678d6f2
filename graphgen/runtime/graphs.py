"""Load an artifact's compiled graphs with their weights bound from the artifact's own checkpoint."""
from __future__ import annotations

import ctypes
import functools
import json
import sys
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file

from ..artifact import ArtifactError, Manifest
from ..backends import backend_module
from ..spec import DTYPES


HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = 14
# safetensors' dtype names (https://github.com/huggingface/safetensors, format: little-endian data)
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def load_weights(manifest: Manifest, device: torch.device) -> dict[str, dict[str, torch.Tensor]]:
    """Per graph: constant name -> tensor, read once from model/*.safetensors and the extra
    constants file, cast to the artifact's dtype, shared between graphs (one copy in memory).
    On the CPU the files are read by `read_safetensors`: tensors of 2 MiB or more in huge pages."""
    read = read_safetensors if device.type == "cpu" and sys.byteorder == "little" \
        else lambda path: load_file(str(path), device=str(device))
    files: dict[str, dict[str, torch.Tensor]] = {"model": {}, "constants": {}}
    for path in sorted(manifest.model_dir.glob("*.safetensors")):
        files["model"].update(read(path))
    if manifest.data.get("constants_file"):
        files["constants"] = read(manifest.path(manifest.data["constants_file"]))
    dtype = DTYPES[manifest.data["dtype"]]
    cast: dict[tuple[str, str], torch.Tensor] = {}
    out = {}
    for phase, graph in manifest.graphs.items():
        bound = {}
        for fqn, (source, key) in graph["weights"].items():
            if (source, key) not in cast and key not in files[source]:
                where = manifest.model_dir if source == "model" else manifest.path(manifest.data["constants_file"])
                raise ArtifactError(f"{where}: tensor '{key}' needed by graph '{phase}' is missing; "
                                    "rebuild with `graphgen compile <recipe> --force`")
            if (source, key) not in cast:
                tensor = files[source].pop(key)  # popped: a cast frees the file's copy as it goes
                if tensor.is_floating_point() and source == "model" and tensor.dtype != dtype:
                    tensor = on_huge_pages(tensor, dtype)
                cast[(source, key)] = tensor.contiguous()
            bound[fqn] = cast[(source, key)]
        out[phase] = bound
    return out


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """A .safetensors file's tensors on the CPU, each read straight from the file into its own
    buffer (`huge_page_buffer` for 2 MiB or more): one copy, no mapping of the whole file kept
    alive while the weights are placed. Format: 8-byte little-endian header length, a JSON header
    {name: {dtype, shape, data_offsets}}, then the data."""
    tensors = {}
    with open(path, "rb") as f:
        try:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                begin, end = info["data_offsets"]
                raw = huge_page_buffer(end - begin)
                f.seek(8 + size + begin)
                if f.readinto(raw.numpy()) != end - begin:
                    raise ValueError(f"tensor '{name}' ends past the end of the file")
                tensors[name] = raw.view(SAFETENSORS_DTYPES[info["dtype"]]).view(info["shape"])
        except (ValueError, KeyError, TypeError) as e:
            raise ArtifactError(f"{path}: not a readable safetensors file ({e}); rebuild with "
                                "`graphgen compile <recipe> --force`") from e
    return tensors


def huge_page_buffer(nbytes: int) -> torch.Tensor:
    """An uninitialized uint8 CPU tensor of nbytes; from 2 MiB up (on Linux), in memory advised as
    transparent huge pages before anything touches it."""
    if nbytes < HUGE_PAGE or not sys.platform.startswith("linux"):
        return torch.empty(nbytes, dtype=torch.uint8)
    # Pages of a large torch.empty are mapped on first touch, so the advice precedes any write.
    raw = torch.empty(nbytes + 2 * HUGE_PAGE, dtype=torch.uint8)
    start = -raw.data_ptr() % HUGE_PAGE
    _libc().madvise(ctypes.c_void_p(raw.data_ptr() + start), ctypes.c_size_t(nbytes + HUGE_PAGE - nbytes % HUGE_PAGE),
                    MADV_HUGEPAGE)
    return raw[start:start + nbytes]


def on_huge_pages(tensor: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A CPU tensor of 2 MiB or more copied (cast to `dtype`, if given, in the same copy) into
    memory advised to Linux as transparent huge pages; anything else as it is (cast if asked).
    Decode streams every weight once per step: with 4 KiB pages that stream misses the TLB every
    4 KiB; with 2 MiB pages bench-125m decodes ~4-6% faster here (docs/performance.md). Where the
    kernel refuses the advice, the copy keeps normal pages."""
    dtype = dtype or tensor.dtype
    nbytes = tensor.numel() * dtype.itemsize
    if tensor.device.type != "cpu" or nbytes < HUGE_PAGE or not sys.platform.startswith("linux"):
        return tensor.to(dtype)
    return huge_page_buffer(nbytes).view(dtype).view(tensor.shape).copy_(tensor)


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


def load_graphs(manifest: Manifest, device: torch.device) -> dict[str, Callable[..., torch.Tensor]]:
    """phase -> callable taking the graph's inputs positionally (manifest order), returning logits."""
    weights = load_weights(manifest, device)
    graphs = {}
    for phase, graph in manifest.graphs.items():
        backend = backend_module(graph["format"])
        try:
            graphs[phase] = backend.load(Path(manifest.path(graph["file"])), weights[phase])
        except (RuntimeError, OSError) as e:
            raise ArtifactError(f"{manifest.path(graph['file'])}: cannot load graph '{phase}' ({e}); "
                                "rebuild with `graphgen compile <recipe> --force`") from e
    return graphs

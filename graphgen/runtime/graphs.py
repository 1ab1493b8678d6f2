"""Load an artifact's compiled graphs with their weights bound from the artifact's own checkpoint."""
from __future__ import annotations

import ctypes
import functools
import json
import math
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
# glibc's mallopt parameters, and what keep_freed_memory sets them to
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
KEEP_FREED_BYTES = 1 << 30
MMAP_FROM_BYTES = 32 << 20  # the most glibc accepts
# safetensors' dtype names (https://github.com/huggingface/safetensors, format: little-endian data)
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def load_weights(manifest: Manifest, device: torch.device) -> dict[str, dict[str, torch.Tensor]]:
    """Per graph: constant name -> tensor, read once from model/*.safetensors and the extra
    constants file, cast to the artifact's dtype, shared between graphs (one copy in memory).
    On the CPU all of them are read into one buffer (`read_packed`) in the order the graphs use
    them (the manifest lists each graph's weights that way): a layer's q, k and v, or gate and up,
    lie side by side, all on huge pages."""
    dtype = DTYPES[manifest.data["dtype"]]
    constants = manifest.data.get("constants_file")
    paths = {"model": sorted(manifest.model_dir.glob("*.safetensors")),
             "constants": [manifest.path(constants)] if constants else []}
    packed = device.type == "cpu" and sys.byteorder == "little"
    if packed:  # (source, key) -> its file, from the headers: the data is read once, below
        headers = {path: safetensors_header(path) for files in paths.values() for path in files}
        stored = {(source, name): path for source, files in paths.items() for path in files
                  for name in headers[path][0]}
    else:
        stored = {(source, name): tensor for source, files in paths.items() for path in files
                  for name, tensor in load_file(str(path), device=str(device)).items()}
    order: dict[tuple[str, str], None] = {}  # (source, key) by first use, each once
    for phase, graph in manifest.graphs.items():
        for source, key in _bound(graph).values():
            if (source, key) not in stored:
                where = manifest.model_dir if source == "model" else manifest.path(constants)
                raise ArtifactError(f"{where}: tensor '{key}' needed by graph '{phase}' is missing; "
                                    "rebuild with `graphgen compile <recipe> --force`")
            order.setdefault((source, key))

    def cast(source: str, stored_dtype: torch.dtype) -> torch.dtype | None:  # the checkpoint's floats
        return dtype if source == "model" and stored_dtype.is_floating_point else None

    if packed:
        wanted = [(stored[source, key], key, functools.partial(cast, source)) for source, key in order]
        tensors = dict(zip(order, read_packed(wanted, headers)))
    else:
        tensors = {}
        for source, key in order:
            tensor = stored.pop((source, key))  # popped: a cast frees the file's copy as it goes
            tensors[(source, key)] = tensor.to(cast(source, tensor.dtype) or tensor.dtype).contiguous()
    return {phase: {fqn: tensors[(source, key)] for fqn, (source, key) in _bound(graph).items()}
            for phase, graph in manifest.graphs.items()}


HEAD = "graphgen.lm_head"  # load_weights' name for a graph's runtime-applied LM head weight


def _bound(graph: dict) -> dict[str, list[str]]:
    """A manifest graph's weights, name -> [source, key]: its constants, then its runtime head (`HEAD`)."""
    return {**graph["weights"], **({HEAD: graph["head"]["weight"]} if "head" in graph else {})}


def safetensors_header(path: Path) -> tuple[dict[str, dict], int]:
    """A .safetensors file's tensors (name -> {dtype, shape, data_offsets}, no metadata) and where
    their data starts. Format: 8-byte little-endian header length, a JSON header, then the data."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (ValueError, OSError) as e:
        raise ArtifactError(f"{path}: not a readable safetensors file ({e}); rebuild with "
                            "`graphgen compile <recipe> --force`") from e
    header.pop("__metadata__", None)
    return header, 8 + size


def read_packed(wanted: list[tuple[Path, str, Callable[[torch.dtype], torch.dtype | None]]],
                headers: dict[Path, tuple[dict, int]] | None = None) -> list[torch.Tensor]:
    """Tensors of .safetensors files, each (path, name, cast: its stored dtype -> the dtype wanted,
    None to keep it), read straight from the files into one buffer (`huge_page_buffer`), one after
    another in the order asked, each 64-byte aligned; a cast happens in the same copy. The
    tensors are views of that buffer (it lives as long as any of them). `headers`: the files'
    `safetensors_header`s where the caller has read them already (the rest are read here)."""
    layout, total = [], 0
    headers = dict(headers or {})
    for path, name, cast in wanted:
        if path not in headers:
            headers[path] = safetensors_header(path)
        header, start = headers[path]
        try:
            info = header[name]
            stored = SAFETENSORS_DTYPES[info["dtype"]]
            begin, end = info["data_offsets"]
            shape = [int(n) for n in info["shape"]]
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactError(f"{path}: tensor '{name}' is missing or unreadable ({e!r}); rebuild with "
                                "`graphgen compile <recipe> --force`") from e
        dtype = cast(stored) or stored
        nbytes = math.prod(shape) * dtype.itemsize
        if end - begin != math.prod(shape) * stored.itemsize:
            raise ArtifactError(f"{path}: tensor '{name}' has {end - begin} bytes for shape {shape} {stored}")
        total = -(-total // 64) * 64
        layout.append((path, start + begin, end - begin, stored, dtype, shape, total))
        total += nbytes
    arena = huge_page_buffer(total)
    out = []
    files = {}
    try:
        for path, offset, size, stored, dtype, shape, at in layout:
            f = files.get(path) or files.setdefault(path, open(path, "rb"))
            slot = arena[at:at + math.prod(shape) * dtype.itemsize]
            raw = slot if dtype == stored else torch.empty(size, dtype=torch.uint8)
            f.seek(offset)
            if f.readinto(raw.numpy()) != size:
                raise ArtifactError(f"{path}: not a readable safetensors file (tensor at {offset} ends past the "
                                    "end of the file); rebuild with `graphgen compile <recipe> --force`")
            tensor = slot.view(dtype).view(shape)
            if dtype != stored:
                tensor.copy_(raw.view(stored).view(shape))
            out.append(tensor)
    finally:
        for f in files.values():
            f.close()
    return out


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


@functools.cache
def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for the next allocation instead of handing it back to
    the kernel (process-wide; True where it took). A CPU step allocates its activations and
    outputs afresh (AOTInductor's buffers, the kernels' outputs) and frees them at its end; with
    glibc's default, blocks past its adaptive thresholds were unmapped or trimmed from the heap on
    free, so every step faulted its pages in again, each zeroed by the kernel: ~100K page faults
    in one mixed run of bench-125m (~300 a step, most of them the linears' first writes to y),
    0.25 s of system time; after this, none. Freed memory stays in the process up to
    KEEP_FREED_BYTES, so the peak footprint is unchanged; blocks of MMAP_FROM_BYTES and more are
    still mapped and unmapped on their own."""
    if not sys.platform.startswith("linux"):
        return False
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None or not hasattr(_libc(), "gnu_get_libc_version"):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_FROM_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, KEEP_FREED_BYTES))


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


def load_graphs(manifest: Manifest, device: torch.device) -> dict[str, Callable[..., torch.Tensor]]:
    """phase -> callable taking the graph's inputs positionally (manifest order), returning logits.
    Graphs that leave the LM head to the runtime come wrapped (`HeadedGraph`): they return logits
    too, and take greedy steps through `greedy_head`."""
    if device.type == "cpu":
        keep_freed_memory()
    weights = load_weights(manifest, device)
    graphs, heads = {}, {}
    for phase, graph in manifest.graphs.items():
        backend = backend_module(graph["format"])
        try:
            graphs[phase] = backend.load(Path(manifest.path(graph["file"])), weights[phase])
        except (RuntimeError, OSError) as e:
            raise ArtifactError(f"{manifest.path(graph['file'])}: cannot load graph '{phase}' ({e}); "
                                "rebuild with `graphgen compile <recipe> --force`") from e
        if "head" in graph:
            weight = weights[phase][HEAD]  # one tensor for every graph (load_weights): one Head, packed once
            if weight.data_ptr() not in heads:
                heads[weight.data_ptr()] = Head(weight)
            graphs[phase] = HeadedGraph(graphs[phase], heads[weight.data_ptr()])
    return graphs


class Head:
    """An LM head (fp32 or bf16) the runtime applies: logits through graphgen's linear kernel (as the
    graph would have called it), and greedy tokens through `greedy_head` where it runs (its int8 copy
    of the weight is packed once, on huge pages, and shared by every graph)."""

    def __init__(self, weight: torch.Tensor):
        from ..ops import greedy_head as gh

        self.weight = weight
        self.packed = self.rows = None
        if weight.device.type == "cpu" and gh.supported():
            shape = gh.packed_shape(*weight.shape)
            buffer = huge_page_buffer(math.prod(shape))
            try:
                self.packed, self.rows = gh.pack_head(weight, buffer.view(torch.int8).view(shape))
            except ValueError:  # weights that are not finite: no bound holds, so logits and their argmax
                pass

    @property
    def greedy(self) -> bool:
        """Whether `tokens` takes the fast path (else it computes the logits and their argmax)."""
        return self.packed is not None

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.ops.graphgen.gemv_linear(hidden, self.weight)

    def tokens(self, hidden: torch.Tensor) -> torch.Tensor:
        """argmax of each row's logits, ties to the lowest id (the sampler's greedy pick)."""
        if self.packed is None:
            return self.logits(hidden).argmax(dim=-1)
        return torch.ops.graphgen.greedy_head(hidden, self.weight, self.packed, self.rows)


class HeadedGraph:
    """A graph compiled without its LM head (its output: the rows the head reads) and the head.
    Called, it returns logits as a graph with the head would; `greedy(rows, *inputs)` returns the
    argmax token of each of the first `rows` rows instead."""

    def __init__(self, graph: Callable[..., torch.Tensor], head: Head):
        self.graph, self.head = graph, head

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.head.logits(self.graph(*inputs))

    def greedy(self, rows: int, *inputs: torch.Tensor) -> torch.Tensor:
        hidden = self.graph(*inputs)  # run even for no rows: the step writes its KV
        return self.head.tokens(hidden[:rows]) if rows else torch.empty(0, dtype=torch.int64)

"""`graphgen::gemv_linear(x, weight) -> x @ weight.T`: the fp32 CPU linear of compiled graphs.

Batch-1 decode is one matrix-vector product per weight matrix, bound by how fast the weights
stream from memory. The kernel (csrc/gemv_linear.cpp: AVX2, OpenMP over bands of weight rows, each
row read once for all of x's 1-4 rows, fp32 accumulation, bf16 rounded to nearest even) is compiled once per machine and torch version into
graphgen's cache and exposed twice:

- to AOTInductor as a C shim (`aoti_torch_cpu_gemv_linear`, see `inductor_configs`), so compiled
  graphs call it directly, with no Python or dispatcher in between;
- to Python as the op's CPU kernel (through ctypes and AOTI tensor handles), so eager graphs and
  tests run the very same code.

Other shapes (more than 4 rows, strided operands) go to oneDNN's inner product (fp32) or ATen's mm
(bf16) inside the shim. The op takes bf16 too (weights widened in registers), but the serving
decompositions route bf16 linears to ATen's oneDNN GEMV, which streams bf16 faster on the AVX2 AMD
machines measured so far (docs/performance.md).
`available()` is False where the CPU lacks AVX2 or no C++ compiler can build the kernel; callers
then keep ATen's linear.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("csrc") / "gemv_linear.cpp"
SHIM = "aoti_torch_cpu_gemv_linear"
SHIM_DECL = f"AOTITorchError {SHIM}(AtenTensorHandle x, AtenTensorHandle weight, AtenTensorHandle* ret0)"
FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
DTYPES = (torch.float32, torch.bfloat16)
MAX_FAST_ROWS = 4  # rows of x the GEMV path takes; more go to oneDNN (compute-bound there)


@torch.library.custom_op("graphgen::gemv_linear", mutates_args=())
def gemv_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (..., K) @ weight (N, K).T -> (..., N), on the CPU, both float32 or both bfloat16."""
    if x.device.type != "cpu" or weight.device.type != "cpu":
        raise ValueError(f"gemv_linear: CPU tensors only, got x on {x.device}, weight on {weight.device}")
    if x.dtype != weight.dtype or x.dtype not in DTYPES:
        raise ValueError(f"gemv_linear: x and weight both float32 or both bfloat16, got {x.dtype} and {weight.dtype}")
    if weight.dim() != 2 or x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"gemv_linear: x (..., K) and weight (N, K) expected, got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    if not available():
        return torch.nn.functional.linear(x, weight)
    return _call(x, weight)


@gemv_linear.register_fake
def _(x, weight):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def inductor_configs() -> dict:
    """What AOTInductor needs to call the op as a C shim: its declaration (the compiled graph
    resolves the symbol from the loaded library at load time)."""
    return {"aot_inductor.custom_ops_to_c_shims": {torch.ops.graphgen.gemv_linear.default: [SHIM_DECL]}}


def available() -> bool:
    """Whether the kernel is built and loaded here (built on first call; False, with one warning
    saying why, where it cannot be)."""
    return _library() is not None


def set_num_threads(threads: int) -> None:
    """The kernel's OpenMP threads (graphgen's runtime passes torch's thread count)."""
    lib = _library()
    if lib is not None:
        lib.graphgen_gemv_set_num_threads(int(threads))


def cache_dir() -> Path:
    """Where built kernels live: $GRAPHGEN_CACHE_DIR, else $XDG_CACHE_HOME/graphgen, else ~/.cache/graphgen."""
    if os.environ.get("GRAPHGEN_CACHE_DIR"):
        return Path(os.environ["GRAPHGEN_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "graphgen"


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


@functools.cache
def _library() -> ctypes.CDLL | None:
    why = _unsupported()
    if why is None:
        try:
            lib = ctypes.CDLL(str(_build()), mode=ctypes.RTLD_GLOBAL)  # global: compiled graphs resolve the shim
        except (OSError, subprocess.CalledProcessError) as e:
            detail = getattr(e, "stderr", None) or str(e)
            why = f"building or loading the kernel failed: {str(detail).strip()[-2000:]}"
    if why is not None:
        warnings.warn(f"graphgen::gemv_linear: {why}; fp32 CPU linears keep ATen/oneDNN", stacklevel=3)
        return None
    lib.graphgen_gemv_set_num_threads.argtypes = [ctypes.c_int]
    lib.graphgen_gemv_set_num_threads(torch.get_num_threads())
    fn = getattr(lib, SHIM)
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)]
    fn.restype = ctypes.c_int32
    return lib


def _unsupported() -> str | None:
    if not sys.platform.startswith("linux"):
        return f"built on Linux only (this is {sys.platform})"
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        return f"needs AVX2 (this CPU: {capability})"
    if _compiler() is None:
        return "no C++ compiler (set CXX or install g++)"
    return None


def _build() -> Path:
    torch_dir = Path(torch.__file__).parent
    cxx = _compiler()
    key = hashlib.sha256("\0".join([SOURCE.read_text(), torch.__version__, str(torch_dir), cxx, *FLAGS])
                         .encode()).hexdigest()[:16]
    out = cache_dir() / "kernels" / key / "libgraphgen_gemv_linear.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    lib_dir = torch_dir / "lib"
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        built = Path(tmp) / out.name
        subprocess.run([cxx, *FLAGS, f"-I{torch_dir / 'include'}", str(SOURCE), "-o", str(built), f"-L{lib_dir}",
                        "-ltorch_cpu", f"-Wl,-rpath,{lib_dir}"], check=True, capture_output=True, text=True)
        os.replace(built, out)  # atomic: concurrent builders each rename a complete file
    return out


_capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_pointer.restype, _capsule_pointer.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
_capsule_new = ctypes.pythonapi.PyCapsule_New
_capsule_new.restype, _capsule_new.argtypes = ctypes.py_object, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]


def _call(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Run the shim on eager tensors through AOTI tensor handles, as a compiled graph would."""
    handles = torch._C._aoti.unsafe_alloc_void_ptrs_from_tensors([x, weight])
    out = ctypes.c_void_p()
    try:
        err = getattr(_library(), SHIM)(*(_capsule_pointer(h, None) for h in handles), ctypes.byref(out))
    finally:
        torch._C._aoti.alloc_tensors_by_stealing_from_void_ptrs(handles)  # frees the input handles
    if err != 0 or not out.value:
        raise RuntimeError(f"gemv_linear: the kernel failed on x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    return torch._C._aoti.alloc_tensors_by_stealing_from_void_ptrs([_capsule_new(out.value, None, None)])[0]

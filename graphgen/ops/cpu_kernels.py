"""graphgen's CPU kernels (csrc/*.cpp): built once per machine and torch version into one library in
graphgen's cache, loaded globally so compiled graphs resolve their C shims, and callable from Python.

Each kernel is an AOTInductor C shim (`aoti_torch_cpu_<op>`), exposed twice:

- to AOTInductor through `inductor_configs()` (`aot_inductor.custom_ops_to_c_shims`), so compiled
  graphs call it directly, with no Python or dispatcher in between;
- to Python through `call()` (ctypes and AOTI tensor handles), so the ops' eager kernels and the
  tests run the very same code.

`available()` is False where the CPU lacks AVX2 or no C++ compiler can build the library (with one
warning saying why); the ops' callers then keep ATen.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

CSRC = Path(__file__).with_name("csrc")
SOURCES = ("gemv_linear.cpp", "packed_causal.cpp", "paged_decode.cpp", "greedy_head.cpp")
HEADERS = ("kernels.h",)
LIBRARY = "libgraphgen_cpu.so"
FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-fPIC", "-std=c++17"]
# op -> (shim symbol, C declaration), as AOTInductor's codegen calls it: tensors as handles,
# floats as double, the outputs through the last pointers.
SHIMS: dict[str, tuple[str, str]] = {
    "gemv_linear": ("aoti_torch_cpu_gemv_linear",
                    "AOTITorchError aoti_torch_cpu_gemv_linear(AtenTensorHandle x, AtenTensorHandle weight, "
                    "AtenTensorHandle* ret0)"),
    "gemv_linear2": ("aoti_torch_cpu_gemv_linear2",
                     "AOTITorchError aoti_torch_cpu_gemv_linear2(AtenTensorHandle x, AtenTensorHandle w0, "
                     "AtenTensorHandle w1, AtenTensorHandle* ret0, AtenTensorHandle* ret1)"),
    "gemv_linear3": ("aoti_torch_cpu_gemv_linear3",
                     "AOTITorchError aoti_torch_cpu_gemv_linear3(AtenTensorHandle x, AtenTensorHandle w0, "
                     "AtenTensorHandle w1, AtenTensorHandle w2, AtenTensorHandle* ret0, AtenTensorHandle* ret1, "
                     "AtenTensorHandle* ret2)"),
    "gemv_gated": ("aoti_torch_cpu_gemv_gated",
                   "AOTITorchError aoti_torch_cpu_gemv_gated(AtenTensorHandle x, AtenTensorHandle gate, "
                   "AtenTensorHandle up, AtenTensorHandle* ret0)"),
    "paged_decode_attention": ("aoti_torch_cpu_paged_decode_attention",
                               "AOTITorchError aoti_torch_cpu_paged_decode_attention(AtenTensorHandle query, "
                               "AtenTensorHandle key_cache, AtenTensorHandle value_cache, "
                               "AtenTensorHandle block_table, AtenTensorHandle seq_lens, double scale, "
                               "AtenTensorHandle* ret0)"),
    "greedy_head": ("aoti_torch_cpu_greedy_head",
                    "AOTITorchError aoti_torch_cpu_greedy_head(AtenTensorHandle x, AtenTensorHandle weight, "
                    "AtenTensorHandle packed, AtenTensorHandle rows, AtenTensorHandle* ret0)"),
    "packed_causal_attention": ("aoti_torch_cpu_packed_causal_attention",
                                "AOTITorchError aoti_torch_cpu_packed_causal_attention(AtenTensorHandle query, "
                                "AtenTensorHandle key, AtenTensorHandle value, AtenTensorHandle cu_seq_lens, "
                                "double scale, AtenTensorHandle* ret0)"),
}


def available() -> bool:
    """Whether the kernels are built and loaded here (built on first call; False, with one warning
    saying why, where they cannot be)."""
    return _library() is not None


def start_build() -> threading.Thread:
    """Build (or find) and load the library in a background thread, for a caller that will need it
    after other work: the compiler starts it before loading the model, so on a machine that has
    never built the kernels the build (seconds of g++) overlaps the model's export."""
    thread = threading.Thread(target=_library, name="graphgen-cpu-kernels", daemon=True)
    thread.start()
    return thread


def set_num_threads(threads: int) -> None:
    """The kernels' OpenMP threads (graphgen's runtime passes torch's thread count)."""
    lib = _library()
    if lib is not None:
        lib.graphgen_set_num_threads(int(threads))


def greedy_head_supported() -> bool:
    """Whether `greedy_head` runs here: the kernels are loaded and the CPU has AVX512-VNNI."""
    lib = _library()
    return lib is not None and bool(lib.graphgen_greedy_head_supported())


def greedy_head_pack(weight: torch.Tensor, packed: torch.Tensor, rows: torch.Tensor) -> bool:
    """Fill `greedy_head`'s packed int8 weight and row data from a contiguous fp32 or bf16 (V, K) weight
    (the layout and checks: ops/greedy_head.py, pack_head); False where the weight is not all finite."""
    return bool(_library().graphgen_greedy_head_pack(weight.data_ptr(), int(weight.dtype == torch.bfloat16),
                                                     weight.shape[0], weight.shape[1], packed.data_ptr(),
                                                     packed.shape[0], rows.data_ptr()))


def inductor_configs() -> dict:
    """What AOTInductor needs to call the ops as C shims: their declarations (the compiled graph
    resolves the symbols from the loaded library at load time)."""
    ops = {getattr(torch.ops.graphgen, name).default: [decl] for name, (_, decl) in SHIMS.items()}
    return {"aot_inductor.custom_ops_to_c_shims": ops}


def last_error() -> str:
    """Why this thread's last failing kernel call failed ('' if none did)."""
    lib = _library()
    return lib.graphgen_last_error().decode() if lib is not None else ""


def cache_dir() -> Path:
    """Where built kernels live: $GRAPHGEN_CACHE_DIR, else $XDG_CACHE_HOME/graphgen, else ~/.cache/graphgen."""
    if os.environ.get("GRAPHGEN_CACHE_DIR"):
        return Path(os.environ["GRAPHGEN_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "graphgen"


def call(op: str, tensors: list[torch.Tensor], *scalars: float, outputs: int = 1):
    """Run op's shim on eager tensors through AOTI tensor handles, as a compiled graph would;
    scalars follow the tensors (as doubles). Returns the output tensor, or a tuple of `outputs`
    tensors. Raises RuntimeError with the kernel's reason."""
    symbol = SHIMS[op][0]
    handles = torch._C._aoti.unsafe_alloc_void_ptrs_from_tensors(tensors)
    outs = [ctypes.c_void_p() for _ in range(outputs)]
    try:
        err = getattr(_library(), symbol)(*(ctypes.c_void_p(_capsule_pointer(h, None)) for h in handles),
                                          *(ctypes.c_double(s) for s in scalars), *map(ctypes.byref, outs))
    finally:
        torch._C._aoti.alloc_tensors_by_stealing_from_void_ptrs(handles)  # frees the input handles
    if err != 0 or not all(out.value for out in outs):
        shapes = ", ".join(str(tuple(t.shape)) for t in tensors)
        raise RuntimeError(f"{last_error() or op + ': the kernel failed'} (inputs {shapes})")
    results = torch._C._aoti.alloc_tensors_by_stealing_from_void_ptrs(
        [_capsule_new(out.value, None, None) for out in outs])
    return results[0] if outputs == 1 else tuple(results)


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


_loaded: list = []  # [library or None] once loaded (or found unusable)
_loading = threading.Lock()


def _library() -> ctypes.CDLL | None:
    if not _loaded:
        with _loading:  # one builder per process; other threads wait for its result
            if not _loaded:
                _loaded.append(_load())
    return _loaded[0]


def _load() -> ctypes.CDLL | None:
    why = unsupported()
    if why is None:
        try:
            lib = ctypes.CDLL(str(_build()), mode=ctypes.RTLD_GLOBAL)  # global: compiled graphs resolve the shims
        except (OSError, subprocess.CalledProcessError) as e:
            detail = getattr(e, "stderr", None) or str(e)
            why = f"building or loading the kernels failed: {str(detail).strip()[-2000:]}"
    if why is not None:
        warnings.warn(f"graphgen's CPU kernels: {why}; fp32 linears and paged decode attention keep ATen",
                      stacklevel=3)
        return None
    lib.graphgen_set_num_threads.argtypes = [ctypes.c_int]
    lib.graphgen_set_num_threads(torch.get_num_threads())
    lib.graphgen_last_error.restype = ctypes.c_char_p
    lib.graphgen_greedy_head_supported.restype = ctypes.c_int
    lib.graphgen_greedy_head_pack.restype = ctypes.c_int
    lib.graphgen_greedy_head_pack.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64,
                                              ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
    for symbol, _ in SHIMS.values():
        getattr(lib, symbol).restype = ctypes.c_int32
    return lib


def unsupported() -> str | None:
    """Why the library cannot be built here, or None where it can."""
    if not sys.platform.startswith("linux"):
        return f"built on Linux only (this is {sys.platform})"
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        return f"needs AVX2 (this CPU: {capability})"
    if _compiler() is None:
        return "no C++ compiler (set CXX or install g++)"
    return None


def library_path() -> Path | None:
    """Where the library for these sources, this torch and this compiler lives in the cache (built
    or not); None where it cannot be built here."""
    if unsupported() is not None:
        return None
    torch_dir = Path(torch.__file__).parent
    texts = [(CSRC / name).read_text() for name in (*SOURCES, *HEADERS)]
    key = hashlib.sha256("\0".join([*texts, torch.__version__, str(torch_dir), _compiler(), *FLAGS]).encode())
    return cache_dir() / "kernels" / key.hexdigest()[:16] / LIBRARY


def _build() -> Path:
    """The library for these sources, torch and compiler: from the cache, else built into it. One
    process builds while others wait on a lock file (the compiler's forked workers, parallel test
    runs); the sources compile in parallel, then link."""
    torch_dir = Path(torch.__file__).parent
    cxx = _compiler()
    out = library_path()
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    import fcntl  # POSIX only; builds happen on Linux only (`unsupported`), the module imports anywhere

    with open(out.parent / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if out.exists():  # another process built it while this one waited
            return out
        lib_dir = torch_dir / "lib"
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            objects = [Path(tmp) / f"{Path(source).stem}.o" for source in SOURCES]

            def compile_one(source: str, obj: Path) -> None:
                _run([cxx, *FLAGS, f"-I{torch_dir / 'include'}", "-c", str(CSRC / source), "-o", str(obj)])

            with ThreadPoolExecutor(len(SOURCES)) as pool:
                for done in [pool.submit(compile_one, s, o) for s, o in zip(SOURCES, objects)]:
                    done.result()
            built = Path(tmp) / out.name
            _run([cxx, *FLAGS, "-shared", *map(str, objects), "-o", str(built), f"-L{lib_dir}", "-ltorch_cpu",
                  f"-Wl,-rpath,{lib_dir}"])
            os.replace(built, out)  # atomic: a reader never sees a partial file
    return out


def _run(command: list[str]) -> None:
    subprocess.run(command, check=True, capture_output=True, text=True)


_capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_pointer.restype, _capsule_pointer.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
_capsule_new = ctypes.pythonapi.PyCapsule_New
_capsule_new.restype, _capsule_new.argtypes = ctypes.py_object, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]

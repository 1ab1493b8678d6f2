"""Inductor backend (cpu/cuda): each paged graph becomes an AOTInductor `.pt2` package.

Weights are not packaged into the compiled library (`package_constants_in_so=False`): the runtime
hands them over from the artifact's HF checkpoint with `load_constants(user_managed=True)`, so both
graphs share one copy in memory and on disk.

The serving calls of the attention ops (paged decode, packed causal prefill) and the CPU linears
are compiled in their serving forms (graphgen/ops/decompositions.py: graphgen's CPU kernels or
ATen), so a decode step runs as compiled code end to end instead of calling back into the Python
reference kernels. The forms are inlined into the graph AOTInductor traces, rather than applied by
`run_decompositions` first, which would trace each graph one more time (seconds per graph).
"""
from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.utils._pytree as pytree

from ..ops import cpu_kernels
from ..ops.decompositions import inline_serving_forms
from . import inductor_toolchain

FORMAT = "aoti"
INDUCTOR_CONFIGS = {
    "aot_inductor.package_constants_in_so": False,
}


def save(ep: torch.export.ExportedProgram, path: Path) -> list[str]:
    """Compile `ep` to an AOTInductor package at `path`; return the constant names it expects.
    What `torch._inductor.aoti_compile_and_package(ep)` does, with the serving forms inlined into
    the module it compiles."""
    from torch._inductor.package import package_aoti

    gm = ep.module(check_guards=False)
    inline_serving_forms(gm)
    args, kwargs = ep.example_inputs
    with warnings.catch_warnings():  # torch's own deep copy of a pytree spec trips its own deprecation
        warnings.filterwarnings("ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning)
        files = torch._inductor.aot_compile(gm, args, kwargs, options=_package_configs())
    package_aoti(str(path), files)
    return list(_loader(path).get_constant_fqns())


def _loader(path: Path):
    """torch's C++ package loader (what `aoti_load_package` wraps, minus its Python side)."""
    return torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1)


def prepare(device: torch.device, say: Callable[[str, str], None] | None = None) -> Callable[[], None]:
    """Start, in the background, what every graph's compile needs once, all built on a machine's
    first compile: on the CPU, torch's precompiled headers (a forked process, which the compile
    waits for only through Inductor's own file locks; inductor_toolchain.py) and graphgen's kernel
    library. Returns the wait for the library, which the compiler calls before the first graph
    compiles (so forked workers inherit the loaded library instead of each building it). Says so
    through `say(stage, detail)` when the library has to be built."""
    if device.type != "cpu":
        return lambda: None
    library = cpu_kernels.library_path()
    if say is not None and library is not None and not library.exists():
        say("prepare", "first compile with this torch here: building graphgen's CPU kernels (once; `graphgen doctor "
                       "--build` builds them and torch's precompiled headers ahead of a compile)")
    inductor_toolchain.start_warmup(_package_configs(with_kernels=False))
    return cpu_kernels.start_build().join


def build_toolchain() -> list[str]:
    """Build (or find) torch's precompiled headers for this backend's CPU compiles now, in this
    process; returns their paths. What `prepare` starts in the background, for `graphgen doctor
    --build` (a machine set up ahead of its first compile)."""
    return inductor_toolchain.build_headers(_package_configs(with_kernels=False))


def _package_configs(with_kernels: bool = True) -> dict:
    """Inductor's options for `save`; `with_kernels=False` leaves out the kernels' shim
    declarations (which would wait for the library's build, and change no build command)."""
    configs = {**INDUCTOR_CONFIGS, "aot_inductor.package": True}
    if with_kernels and cpu_kernels.available():  # compiled graphs call graphgen's CPU kernels as C shims
        configs.update(cpu_kernels.inductor_configs())
    return configs


class CompiledGraph:
    """A loaded package, called with positional tensors. torch's AOTICompiledModel parses its call
    spec (JSON) and pytree-flattens on every call; here the output spec is parsed once and the
    inputs go straight to the loader, which matters for a decode step of a fraction of a ms."""

    def __init__(self, loader):
        self.loader = loader
        self._run = loader.boxed_run
        self._out_spec = pytree.treespec_loads(loader.get_call_spec()[1])

    def __call__(self, *inputs: torch.Tensor):
        try:
            outputs = self._run(list(inputs))
        except RuntimeError as e:  # a failing C shim leaves only "API call failed" in e; say why
            why = cpu_kernels.last_error() if cpu_kernels.available() else ""
            if why:
                raise RuntimeError(f"{e}\n{why}") from e
            raise
        return pytree.tree_unflatten(outputs, self._out_spec)


# What each word of Inductor's CPU ISA string (`str(pick_vec_isa())`: "avx2", "avx512",
# "avx512 avx512_vnni", "avx512 avx512_vnni amx_tile") asks of the CPU, as torch.cpu probes it.
_ISA_PROBES = {"avx2": "_is_avx2_supported", "avx512": "_is_avx512_supported", "avx512_vnni": "_is_vnni_supported",
               "amx_tile": "_is_amx_tile_supported"}


def isa_runs_here(built: str) -> bool:
    """Whether kernels Inductor compiled for the ISA string `built` run on this CPU: every feature
    it names is here (an AVX2 package runs on an AVX-512 CPU). Words torch cannot probe fall back
    to comparing with torch's own capability name."""
    words = built.lower().split()
    probes = [getattr(torch.cpu, _ISA_PROBES.get(w, ""), None) for w in words]
    if words and all(probes):
        return all(probe() for probe in probes)
    return built.upper() in (torch.backends.cpu.get_cpu_capability().upper(), "NONE", "DEFAULT")


def _check_isa(path: Path) -> None:
    """The package's kernels target the CPU ISA of the machine that compiled them (what
    torch._inductor's loader warns about; checked here without importing the compiler)."""
    meta = torch._C._aoti.AOTIModelPackageLoader.load_metadata_from_package(str(path), "model")
    built = meta.get("AOTI_CPU_ISA")
    if meta.get("AOTI_DEVICE_KEY", "cpu") == "cpu" and built and not isa_runs_here(built):
        here = torch.backends.cpu.get_cpu_capability()
        warnings.warn(f"{path}: compiled for CPU ISA {built}, which this CPU ({here}) lacks; if the graph fails, "
                      "rebuild the artifact here with `graphgen compile <recipe> --force`", stacklevel=3)


def load(path: Path, constants: dict[str, torch.Tensor]) -> CompiledGraph:
    """Load the package and bind its constants (shared with the caller, not copied). Uses the C++
    loader directly: `torch._inductor.aoti_load_package` imports the whole compiler (seconds)."""
    _check_isa(path)
    if cpu_kernels.available():  # loads the kernel library the graph's shim calls resolve to
        cpu_kernels.set_num_threads(torch.get_num_threads())
    try:
        loader = _loader(path)
    except RuntimeError as e:
        shim = next((symbol for symbol, _ in cpu_kernels.SHIMS.values() if symbol in str(e)), None)
        if shim:
            raise RuntimeError(f"{path}: the graph calls graphgen's CPU kernel {shim}, which could not be built or "
                               "loaded here (see the warning above); install a C++ compiler (g++) or rebuild the "
                               "artifact on this machine") from e
        raise
    expected = set(loader.get_constant_fqns())
    missing = sorted(expected - constants.keys())
    if missing:
        raise RuntimeError(f"{path}: graph constants missing from the artifact's weights: {missing[:5]}")
    # (constants, use_inactive, check_full_update, user_managed): bound in place, not copied
    loader.load_constants({k: constants[k] for k in expected}, False, True, True)
    return CompiledGraph(loader)

"""What AOTInductor's C++ builds on the CPU need once per machine, built early and off to the side.

On a machine's first compile, torch's Inductor builds two precompiled headers (about 10 s of g++
each: `aoti_include/cpu.h` for the graphs' wrappers, `cpp_prefix.h` for their kernels) and a small
library that proves the vector ISA works. It does so inside the first graph compile that gets there,
while the other compile workers wait on its file locks with a core idle: the first `graphgen
compile` of the tiny recipe on a fresh machine took 77-83 s where later ones take 55-65 s.

`start_warmup()` forks a process, at the start of a compile, that builds them while the parent
loads and exports the model. It makes the very calls AOTInductor makes (`aoti_header_builds`
mirrors `AotCodeCompiler.compile` in torch/_inductor/codecache.py, checked by a test against a real
compile) under Inductor's own file locks, so a worker that gets there first builds them, and one
that gets there while the warm-up builds waits for it, just as workers already wait for each other.
A process rather than a thread: the compile workers are forked while it runs, and a fork taken
while a thread holds a pipe or a lock can hang the child. Where they are already built (every
compile after a machine's first), the warm-up finds them in about a second, on the idle core.
"""
from __future__ import annotations

import atexit
import os
import sys
import threading

_children: list[int] = []
_ready = False  # a warm-up finished cleanly in this process: the headers exist, skip the next


def aoti_header_builds(configs: dict) -> list[tuple[str, str, dict]]:
    """The `_precompile_header(header, cmd_line, **kwargs)` calls AOTInductor makes for a CPU graph
    compiled with `configs` (package mode, weights not in the library), as (header, cmd_line,
    kwargs); [] where it precompiles none (config.aot_inductor.precompile_headers off)."""
    from torch._inductor import config
    from torch._inductor.codecache import _get_cpp_prefix_header, _get_cpp_wrapper_header
    from torch._inductor.cpp_builder import CppBuilder, CppTorchDeviceOptions
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    with config.patch(configs):
        if not config.aot_inductor.precompile_headers:
            return []
        isa = pick_vec_isa()
        options = CppTorchDeviceOptions(vec_isa=isa, device_type="cpu", aot_mode=True)
        cmd_line = repr(CppBuilder(name="o", sources="i", BuildOption=options).get_command_line())
        # weights stay out of the library (package_constants_in_so=False): no mmap'd constants
        kwargs = dict(aot_mode=True, device_type="cpu", use_mmap_weights=False,
                      use_mmap_weights_external=False, use_relative_path=False, vec_isa=isa)
        builds = [(_get_cpp_wrapper_header("cpu", aot_mode=True), cmd_line,
                   {"min_optimize": not config.aot_inductor.package_cpp_only, **kwargs})]
        if prefix := _get_cpp_prefix_header("cpu"):
            builds.append((prefix, cmd_line, kwargs))
        return builds


def build_headers(configs: dict) -> list[str]:
    """Build (or find) the precompiled headers of `aoti_header_builds(configs)`, in parallel;
    returns their paths (each `<path>.gch` beside it, for g++)."""
    from torch._inductor import config
    from torch._inductor.codecache import _precompile_header

    failures: list[BaseException] = []
    paths: list[str] = []

    def build(header: str, cmd_line: str, kwargs: dict) -> None:
        try:
            paths.append(_precompile_header(header, cmd_line, **kwargs))
        except BaseException as e:  # reported through the exit status; the compile builds its own
            failures.append(e)

    with config.patch(configs):  # Inductor's config is global: patched once, around both builds
        threads = [threading.Thread(target=build, args=call) for call in aoti_header_builds(configs)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    if failures:
        raise failures[0]
    return sorted(paths)


def start_warmup(configs: dict) -> None:
    """Fork the warm-up process (see the module docstring); returns at once. Skipped once one has
    finished cleanly in this process, and off Linux (a fork once system frameworks have started is
    not safe everywhere: macOS)."""
    _reap()
    if _ready or not sys.platform.startswith("linux"):
        return
    pid = os.fork()
    if pid == 0:  # the child: nothing of the parent's runs here, and it leaves through os._exit
        code = 1
        try:
            devnull = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):  # don't hold the parent's pipes open (a caller reading to EOF)
                os.dup2(devnull, fd)
            build_headers(configs)
            code = 0
        finally:
            os._exit(code)
    atexit.unregister(_reap)  # once: a child that ends before we do is collected by us at exit,
    atexit.register(_reap)  # not left to an init that may never reap it (a container's)
    _children.append(pid)


def _reap() -> None:
    """Collect warm-ups that have ended (no zombies in a long-lived process)."""
    global _ready
    for pid in list(_children):
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:  # reaped elsewhere
            _children.remove(pid)
            continue
        if done:
            _children.remove(pid)
            _ready = _ready or os.waitstatus_to_exitcode(status) == 0

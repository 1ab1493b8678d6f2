"""The toolchain warm-up: it must build the very precompiled headers AOTInductor asks for (else it
burns a core on headers nobody uses), and run as a forked process the compiler never waits on."""
import os
import sys
import time

import pytest
import torch

import graphgen.backends.inductor as inductor
from graphgen.backends import inductor_toolchain

fork_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the warm-up is a forked process (Linux)")


class _Double(torch.nn.Module):
    def forward(self, x):
        return x * 2 + 1


def test_warmup_builds_the_headers_a_real_compile_asks_for(tmp_path, monkeypatch):
    """Record the `_precompile_header` calls of a real `save` (torch's AotCodeCompiler), which then
    fails at g++ on the recorded calls' dummy paths, and compare them with the warm-up's."""
    import torch._inductor.codecache as codecache

    calls = []

    def record(header, cmd_line, **kwargs):
        calls.append((header, cmd_line, kwargs))
        return str(tmp_path / f"not-built-{len(calls)}.h")

    monkeypatch.setattr(codecache, "_precompile_header", record)
    ep = torch.export.export(_Double(), (torch.randn(4, 8),))
    with pytest.raises(Exception):  # noqa: B017 (g++ cannot include the dummy headers)
        inductor.save(ep, tmp_path / "double.pt2")
    expected = inductor_toolchain.aoti_header_builds(inductor._package_configs(with_kernels=False))
    assert calls, "torch no longer precompiles headers for AOTInductor: drop the warm-up"
    assert calls == expected


@fork_only
def test_warmup_runs_in_a_child_once_per_process(monkeypatch, tmp_path):
    """The child builds through `build_headers` (here a stand-in that leaves a mark), exits 0, is
    reaped, and a clean finish makes later compiles in this process skip the warm-up."""
    marks = tmp_path / "marks"
    marks.mkdir()
    monkeypatch.setattr(inductor_toolchain, "_ready", False)
    monkeypatch.setattr(inductor_toolchain, "_children", [])
    monkeypatch.setattr(inductor_toolchain, "build_headers",
                        lambda configs: (marks / str(os.getpid())).write_text(repr(configs)))
    inductor_toolchain.start_warmup({"aot_inductor.package": True})
    assert len(inductor_toolchain._children) == 1
    child = inductor_toolchain._children[0]
    deadline = time.monotonic() + 60
    while inductor_toolchain._children and time.monotonic() < deadline:
        time.sleep(0.05)
        inductor_toolchain._reap()
    assert not inductor_toolchain._children and inductor_toolchain._ready
    assert [p.name for p in marks.iterdir()] == [str(child)]
    assert (marks / str(child)).read_text() == "{'aot_inductor.package': True}"
    inductor_toolchain.start_warmup({"aot_inductor.package": True})
    assert inductor_toolchain._children == [] and len(list(marks.iterdir())) == 1


@fork_only
def test_a_failed_warmup_is_tried_again(monkeypatch):
    def fail(configs):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(inductor_toolchain, "_ready", False)
    monkeypatch.setattr(inductor_toolchain, "_children", [])
    monkeypatch.setattr(inductor_toolchain, "build_headers", fail)
    inductor_toolchain.start_warmup({})
    pid = inductor_toolchain._children[0]
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 1
    inductor_toolchain._reap()  # reaped above: dropped without a verdict
    assert inductor_toolchain._children == [] and not inductor_toolchain._ready
    inductor_toolchain.start_warmup({})
    assert len(inductor_toolchain._children) == 1
    os.waitpid(inductor_toolchain._children.pop(), 0)


def test_prepare_says_when_this_is_a_first_compile(tmp_path, monkeypatch):
    """On the CPU, `prepare` starts the warm-up and the kernel build, and says so when the kernels
    are not built yet (a machine's first compile, which `graphgen doctor --build` avoids)."""
    from graphgen.ops import cpu_kernels

    started = []
    monkeypatch.setattr(inductor_toolchain, "start_warmup", lambda configs: started.append("headers"))
    monkeypatch.setattr(cpu_kernels, "start_build", lambda: started.append("kernels") or _Joinable())
    library = tmp_path / "lib.so"
    monkeypatch.setattr(cpu_kernels, "library_path", lambda: library)
    said = []
    inductor.prepare(torch.device("cpu"), lambda stage, detail: said.append((stage, detail)))()
    assert started == ["headers", "kernels"]
    assert len(said) == 1 and said[0][0] == "prepare" and "graphgen doctor --build" in said[0][1]
    library.touch()
    said.clear()
    inductor.prepare(torch.device("cpu"), lambda stage, detail: said.append((stage, detail)))()
    assert said == []
    assert inductor.prepare(torch.device("meta"), pytest.fail)() is None and started == ["headers", "kernels"] * 2


class _Joinable:
    def join(self):
        return None

"""graphgen doctor: facts, per-target verdicts, exit codes, rendering."""
import io
import os
import sys
import types
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from graphgen.backends import torchair as tb
from graphgen.doctor import build_caches, doctor, print_builds, print_doctor
from graphgen.recipe import DEFAULT_RECIPE_YAML


def _recipe_file(tmp_path, **over):
    data = yaml.safe_load(DEFAULT_RECIPE_YAML) | over
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.fixture
def no_npu(monkeypatch):
    monkeypatch.delenv(tb.STAND_IN_ENV, raising=False)
    monkeypatch.setattr("graphgen.doctor._installed", lambda name: name != "torch_npu")


def test_facts_and_cpu_recipe(no_npu, tmp_path):
    report, code = doctor(_recipe_file(tmp_path))
    assert code == 0 and report["recipe"]["ok"] and report["targets"]["cpu"] == {"compile": True, "run": True,
                                                                                   "why": "always"}
    for key in ("torch", "transformers", "torch_npu", "torchair", "cann", "devices", "import_order"):
        assert key in report
    assert report["torch_npu"] is None and "graphgen[npu]" in report["npu_error"]


def test_npu_recipe_without_torch_npu_exits_nonzero(no_npu, tmp_path):
    path = _recipe_file(tmp_path, target="npu", dtype="bfloat16", compile={"backend": "torchair"})
    report, code = doctor(path)
    assert code == 1 and not report["recipe"]["ok"] and "torch_npu" in report["recipe"]["why"]


def test_stand_in_can_compile_npu_but_not_run_it(monkeypatch, tmp_path):
    monkeypatch.setattr("graphgen.doctor._installed", lambda name: name != "torch_npu")
    monkeypatch.setenv(tb.STAND_IN_ENV, "eager")
    report, code = doctor(_recipe_file(tmp_path, target="npu", dtype="float16", compile={"backend": "torchair"}))
    assert code == 0 and report["targets"]["npu"]["compile"] and not report["targets"]["npu"]["run"]
    assert "emulated" in report["targets"]["npu"]["why"]


def test_with_torch_npu_and_torchair_reports_versions(monkeypatch):
    npu = types.ModuleType("torch_npu")
    npu.__version__ = "2.13.0.post1"
    air = types.ModuleType("torchair")
    air.__version__ = "0.2"
    monkeypatch.setitem(sys.modules, "torch_npu", npu)
    monkeypatch.setitem(sys.modules, "torchair", air)
    monkeypatch.setattr("graphgen.doctor._installed", lambda name: True)
    report, code = doctor(None)
    assert report["torch_npu"] == "2.13.0.post1" and report["torchair"] == "0.2"
    assert report["targets"]["npu"]["compile"] and not report["targets"]["npu"]["run"]  # no device here
    assert report["import_order"].startswith("torch_npu before torchair") and code == 0


def test_wrong_import_order_exits_nonzero(monkeypatch):
    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)
    monkeypatch.setitem(sys.modules, "torchair", types.ModuleType("torchair"))
    monkeypatch.setattr("graphgen.doctor._installed", lambda name: True)
    report, code = doctor(None)
    assert code == 1 and "graph mode will not engage" in report["import_order"]


def test_bad_recipe_and_rendering(no_npu, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel: {config: {model_type: llama}}\nkv_cache: {block_size: 10}\n")
    report, code = doctor(str(bad))
    assert code == 1 and "block_size" in report["recipe"]["why"]
    buf = io.StringIO()
    print_doctor(report, Console(file=buf, width=120))
    text = buf.getvalue()
    assert "targets on this machine" in text and "graphgen[npu]" in text and "torch_npu" in text


def test_build_caches_builds_kernels_beside_headers(monkeypatch, tmp_path):
    """Kernels (in a thread) and headers are both built; each row says built vs already built and
    names its files; the exit code is 0."""
    from graphgen.backends import inductor
    from graphgen.ops import cpu_kernels

    library, header = tmp_path / "k" / "lib.so", tmp_path / "h.h"
    monkeypatch.setattr(cpu_kernels, "library_path", lambda: library)
    monkeypatch.setattr(cpu_kernels, "available", lambda: library.parent.mkdir(exist_ok=True) or library.touch() or True)
    monkeypatch.setattr(inductor, "build_toolchain", lambda: Path(f"{header}.gch").touch() or [str(header)])
    rows, code = build_caches()
    assert code == 0 and [r["ok"] for r in rows] == [True, True]
    assert rows[0]["detail"] == f"built: {library}" and rows[1]["detail"] == f"built: {header}.gch"
    os.utime(f"{header}.gch", (0, 0))  # an old header: found, not built
    monkeypatch.setattr(inductor, "build_toolchain", lambda: [str(header)])
    rows, code = build_caches()
    assert code == 0 and rows[0]["detail"].startswith("already built: ") and rows[1]["detail"].startswith("already built: ")

    def broken():
        raise OSError("cannot write the cache")

    monkeypatch.setattr(cpu_kernels, "available", broken)  # a kernel build that raises is a failed row
    rows, code = build_caches()
    assert code == 1 and not rows[0]["ok"] and rows[0]["detail"] == "OSError: cannot write the cache"


def test_build_caches_failures(monkeypatch):
    """A header build that fails is a failure (exit 1, the error named); kernels that cannot be
    built here are not (compiles keep ATen), and are not attempted."""
    from graphgen.backends import inductor
    from graphgen.ops import cpu_kernels

    def fail():
        raise RuntimeError("g++: not found")

    monkeypatch.setattr(cpu_kernels, "library_path", lambda: None)
    monkeypatch.setattr(cpu_kernels, "unsupported", lambda: "needs AVX2 (this CPU: DEFAULT)")
    monkeypatch.setattr(cpu_kernels, "available", lambda: pytest.fail("built where it cannot be"))
    monkeypatch.setattr(inductor, "build_toolchain", fail)
    rows, code = build_caches()
    assert code == 1 and rows[0]["ok"] and "needs AVX2" in rows[0]["detail"]
    assert not rows[1]["ok"] and rows[1]["detail"].startswith("RuntimeError: g++: not found (")
    assert "install g++, or point CXX" in rows[1]["detail"]
    buf = io.StringIO()
    print_builds(rows, Console(file=buf, width=200))
    assert "g++: not found" in buf.getvalue() and "per-machine build caches" in buf.getvalue()


def test_doctor_build_on_this_machine(no_npu):
    """The real builds (found, where `make setup` already ran `graphgen doctor --build`), through
    the command line: the kernel library and both precompiled headers exist afterwards."""
    from typer.testing import CliRunner

    from graphgen.cli import app
    from graphgen.ops import cpu_kernels

    result = CliRunner().invoke(app, ["doctor", "--build"])
    assert result.exit_code == 0, result.output
    assert "per-machine build caches" in result.output
    path = cpu_kernels.library_path()
    assert path is None or path.exists()
    rows, code = build_caches()
    assert code == 0 and rows[1]["detail"].startswith("already built: ")
    assert all(os.path.exists(f) for f in rows[1]["detail"].removeprefix("already built: ").split(", "))

"""The phase graphs compile in forked workers: how many at once, what a failing worker reports.

The session fixture `tiny_artifact` (conftest.py) is built by compile_recipe with Inductor, so on a
Linux machine with memory to spare its three graphs come from these workers; every test that loads
it (test_compile, test_runtime, test_bench, ...) checks the parallel-built artifact.
"""
import os
import time
import zipfile
from pathlib import Path

import pytest
import torch

import graphgen.backends.inductor as inductor
import graphgen.compiler as compiler
from graphgen.compiler import WORKER_OVERHEAD_BYTES, CompileError, CompileWorkers, compile_jobs, compile_recipe
from graphgen.recipe import default_recipe

GIB = 1 << 30

fork_only = pytest.mark.skipif(not hasattr(os, "fork"), reason="compile workers are forked (Linux)")


def test_one_job_per_graph_up_to_one_more_than_the_cores():
    assert compile_jobs(3, 10 << 20, cpus=2, available=64 * GIB) == 3
    assert compile_jobs(3, 10 << 20, cpus=1, available=64 * GIB) == 2
    assert compile_jobs(3, 10 << 20, cpus=64, available=64 * GIB) == 3
    assert compile_jobs(1, 10 << 20, cpus=64, available=64 * GIB) == 1


def test_jobs_fit_in_half_the_available_memory():
    # 14 GiB of weights (a 7B model in bf16): 15 GiB a worker, 64 GiB available -> 32 // 15
    assert compile_jobs(3, 14 * GIB, cpus=16, available=64 * GIB) == 2
    assert compile_jobs(3, 14 * GIB, cpus=16, available=40 * GIB) == 1
    assert compile_jobs(3, 0, cpus=16, available=2 * 3 * WORKER_OVERHEAD_BYTES - 1) == 2


def test_serial_when_cores_or_memory_are_unknown():
    assert compile_jobs(3, 10 << 20, cpus=None, available=64 * GIB) == 1
    assert compile_jobs(3, 10 << 20, cpus=2, available=None) == 1


@pytest.mark.skipif(not Path("/proc/meminfo").is_file(), reason="Linux /proc/meminfo")
def test_mem_available_reads_proc_meminfo():
    assert compiler._mem_available() > 0


def _fake_save(behaviour: dict, pids: Path):
    """A backend save that does what `behaviour[phase]` says (path stem = phase), fast."""

    def save(ep, path):
        phase = Path(path).stem
        # written whole, then renamed: a worker killed mid-write leaves a partial dot-file, not an
        # empty pid file (CI once read one: a race in this test, not in CompileWorkers)
        (pids / f".{phase}").write_text(str(os.getpid()))
        os.replace(pids / f".{phase}", pids / phase)
        what = behaviour.get(phase, "ok")
        if what == "raise":
            class Unpicklable(Exception):  # local class: pickling it would fail; text must come back
                pass

            raise Unpicklable(f"injected failure compiling {phase}")
        if what == "exit":
            os._exit(7)
        if what == "hang":
            time.sleep(600)
        return [f"{phase}.weight", f"threads={torch.get_num_threads()}"]

    return save


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@fork_only
def test_workers_return_results_in_submission_order(tmp_path):
    said = []
    save = _fake_save({}, tmp_path)
    with CompileWorkers(2, lambda stage, detail: said.append(detail)) as workers:
        for phase in ("prefill", "extend", "decode"):
            workers.submit(phase, save, None, tmp_path / f"{phase}.pt2")
        results = workers.results()
    assert list(results) == ["prefill", "extend", "decode"]
    # the worker runs single-threaded, but code is generated for the parent's thread count
    assert results["decode"] == ["decode.weight", f"threads={torch.get_num_threads()}"]
    assert sorted(d.split(":")[0] for d in said) == ["decode", "extend", "prefill"]
    assert all("compiled in" in d for d in said)


@fork_only
def test_a_failing_worker_names_its_phase_and_carries_the_traceback(tmp_path):
    save = _fake_save({"extend": "raise", "decode": "hang"}, tmp_path)
    start = time.perf_counter()
    with pytest.raises(CompileError) as err:
        with CompileWorkers(3, lambda *_: None) as workers:
            for phase in ("prefill", "extend", "decode"):
                workers.submit(phase, save, None, tmp_path / f"{phase}.pt2")
            workers.results()
    message = str(err.value)
    assert message.startswith("extend: backend compile failed in its worker process")
    assert "Traceback" in message and "Unpicklable: injected failure compiling extend" in message
    assert time.perf_counter() - start < 60  # the hanging decode worker was killed, not waited for
    assert all(_gone(int(f.read_text())) for f in tmp_path.iterdir() if not f.name.startswith("."))


@fork_only
def test_a_worker_that_dies_is_reported_with_its_exit_code(tmp_path):
    with pytest.raises(CompileError, match=r"^prefill: the backend compile worker .* exit code 7"):
        with CompileWorkers(2, lambda *_: None) as workers:
            workers.submit("prefill", _fake_save({"prefill": "exit"}, tmp_path), None, tmp_path / "prefill.pt2")
            workers.results()


@fork_only
def test_compile_recipe_stops_on_a_failed_phase(tmp_path, monkeypatch):
    """Through compile_recipe (load, capture and three exports; no Inductor compile): the phase
    named, no artifact left behind."""
    monkeypatch.setattr(compiler, "compile_jobs", lambda *args, **kwargs: 3)
    monkeypatch.setattr(inductor, "save", _fake_save({"decode": "raise"}, tmp_path))
    said = []
    out = tmp_path / "artifact"
    with pytest.raises(CompileError, match=r"^decode: backend compile failed") as err:
        compile_recipe(default_recipe(), output=out, progress=lambda stage, detail: said.append(detail))
    assert "injected failure compiling decode" in str(err.value)
    assert "prefill: inductor (compiling in parallel, 3 workers)" in said
    assert not out.exists()


class _Elementwise(torch.nn.Module):
    def forward(self, x):
        return torch.sin(x) * x + 1.0


@pytest.mark.slow
@fork_only
@pytest.mark.skipif(torch.get_num_threads() < 2, reason="one thread: no parallel regions to check")
def test_worker_kernels_are_threaded_like_a_serial_compile(tmp_path):
    """A worker runs single-threaded; its kernels must still be OpenMP-parallel for the parent's
    thread count (Inductor writes no parallel region at all for one thread). A graph of one
    elementwise kernel over 128K elements, through a worker and the Inductor backend's save (the
    tiny artifact's own kernels are too small to be parallel: its linears, gated MLPs and attention
    are graphgen's CPU kernels)."""
    ep = torch.export.export(_Elementwise(), (torch.randn(512, 256),))
    path = tmp_path / "prefill.pt2"
    with CompileWorkers(1, lambda *_: None) as workers:
        workers.submit("prefill", inductor.save, ep, path)
        workers.results()
    with zipfile.ZipFile(path) as package:
        kernels = [package.read(n).decode() for n in package.namelist() if n.endswith("kernel.cpp")]
    assert kernels and any("#pragma omp parallel" in code for code in kernels)

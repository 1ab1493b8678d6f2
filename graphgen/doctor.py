"""`graphgen doctor`: what this machine has, and which targets it can compile for and run.

`doctor(recipe_path)` returns (report, exit code): versions of torch, transformers, torch_npu,
torchair and CANN, device facts, whether torch_npu was imported before torchair, and per target
(cpu, cuda, npu) whether it can compile and run here. The exit code is 1 when the recipe's target
(if a recipe is given) cannot be compiled here, else 0. `print_doctor(report, console)` renders it.

`build_caches()` (`graphgen doctor --build`) builds what a machine's first CPU compile otherwise
builds inside it, once per machine and torch version: graphgen's CPU kernels and torch's
precompiled headers for AOTInductor. A machine (or a container image) set up that way compiles its
first artifact as fast as its later ones.
"""
from __future__ import annotations

import importlib.util
import os
import platform
import sys
import threading
import time
from typing import Any

import torch

from .backends import torchair as tb


def _installed(name: str) -> bool:
    return name in sys.modules and sys.modules[name] is not None or importlib.util.find_spec(name) is not None


def _npu_facts() -> dict[str, Any]:
    facts: dict[str, Any] = {"torch_npu": None, "torchair": None, "devices": 0, "import_order_ok": None, "error": None}
    if not _installed("torch_npu"):
        facts["error"] = "torch_npu is not installed (pip install 'graphgen[npu]' on an Ascend machine)"
        return facts
    facts["import_order_ok"] = tb.import_order_ok()
    try:
        tng = tb.import_torchair()
        facts["torch_npu"] = tb._version_of("torch_npu")
        facts["torchair"] = str(getattr(tng, "__version__", "unknown"))
        npu = getattr(torch, "npu", None)
        facts["devices"] = int(npu.device_count()) if npu is not None and npu.is_available() else 0
        if facts["devices"]:
            facts["device_name"] = npu.get_device_name(0)
        facts["npugraph_ex"] = "npugraph_ex" in torch._dynamo.list_backends(exclude_tags=())
    except Exception as e:  # noqa: BLE001  (a broken install is a fact to report, not a crash)
        facts["error"] = f"{type(e).__name__}: {e}"
    return facts


def _targets(npu: dict[str, Any]) -> dict[str, dict[str, Any]]:
    cuda = torch.cuda.is_available()
    standin = os.environ.get(tb.STAND_IN_ENV)
    npu_compile = npu["torchair"] is not None and npu["error"] is None
    return {
        "cpu": {"compile": True, "run": True, "why": "always"},
        "cuda": {"compile": cuda, "run": cuda, "why": "CUDA device found" if cuda else "no CUDA device"},
        "npu": {
            "compile": npu_compile or standin in tb.STAND_INS,
            "run": npu_compile and npu["devices"] > 0,
            "why": ("torch_npu + torchair + an NPU" if npu_compile and npu["devices"]
                    else f"stand-in {tb.STAND_IN_ENV}={standin}: lowered graphs build and run emulated on CPU"
                    if standin in tb.STAND_INS else npu["error"] or "no NPU device visible"),
        },
    }


def _kernel_state() -> str:
    from .ops import cpu_kernels

    path = cpu_kernels.library_path()
    if path is None:
        return f"cannot be built here: {cpu_kernels.unsupported()}; linears and paged decode keep ATen"
    return f"built: {path}" if path.exists() else "not built yet (the first CPU compile builds them, or --build)"


def build_caches() -> tuple[list[dict[str, Any]], int]:
    """Build (or find) graphgen's CPU kernels and torch's precompiled headers now, the kernels in
    a thread beside the headers. Returns (rows of item, ok, seconds, detail; exit code: 1 where a
    build failed). Kernels that cannot be built here (no AVX2) are not a failure: compiles keep
    ATen for them."""
    from .backends import inductor
    from .ops import cpu_kernels

    start, wall_start = time.perf_counter(), time.time()
    kernels = cpu_kernels.library_path()
    kernel_row: dict[str, Any] = {"item": "graphgen CPU kernels", "ok": kernels is None, "seconds": 0.0,
                                  "detail": f"not built here: {cpu_kernels.unsupported()}; compiles keep ATen for them"}

    def build_kernels() -> None:
        had = kernels.exists()
        try:
            ok = cpu_kernels.available()
            detail = f"{'already built' if had else 'built'}: {kernels}" if ok else "the build failed (see the warning above)"
        except Exception as e:  # noqa: BLE001  (reported in the row, like a failed header build)
            ok, detail = False, f"{type(e).__name__}: {e}"
        kernel_row.update(ok=ok, seconds=time.perf_counter() - start, detail=detail)

    thread = threading.Thread(target=build_kernels, name="graphgen-cpu-kernels")
    if kernels is not None:
        thread.start()
    header_row: dict[str, Any] = {"item": "torch precompiled headers (AOTInductor, CPU)", "ok": True}
    try:
        headers = inductor.build_toolchain()
        built = [next((f for f in (f"{h}.gch", f"{h}.pch") if os.path.exists(f)), h) for h in headers]  # g++, clang
        made = any(os.path.getmtime(f) >= wall_start - 1 for f in built)  # file times trail the clock a little
        header_row["detail"] = ("built: " if made else "already built: ") + ", ".join(built)
    except Exception as e:  # noqa: BLE001  (g++ missing or failing: reported, the exit code says so)
        header_row.update(ok=False, detail=f"{type(e).__name__}: {e} (torch's Inductor compiles C++ here: install "
                                            "g++, or point CXX at a working C++ compiler)")
    header_row["seconds"] = time.perf_counter() - start
    if kernels is not None:
        thread.join()
    rows = [kernel_row, header_row]
    return rows, 0 if all(row["ok"] for row in rows) else 1


def doctor(recipe_path: str | None = None) -> tuple[dict[str, Any], int]:
    """(report, exit code): facts, per-target ability, and the recipe's verdict when one is given."""
    import transformers

    npu = _npu_facts()
    report: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_npu": npu["torch_npu"],
        "torchair": npu["torchair"],
        "cann": tb.cann_version(),
        "devices": {"cuda": torch.cuda.device_count() if torch.cuda.is_available() else 0, "npu": npu["devices"]},
        "device_name": npu.get("device_name"),
        "import_order": {None: "torchair not imported", True: "torch_npu before torchair (ok)",
                         False: "torchair before torch_npu: graph mode will not engage"}[npu["import_order_ok"]],
        "npugraph_ex": npu.get("npugraph_ex"),
        "npu_error": npu["error"],
        "targets": _targets(npu),
        "cpu_kernels": _kernel_state(),
        "recipe": None,
    }
    code = 1 if npu["import_order_ok"] is False else 0
    if recipe_path is not None:
        from .recipe import RecipeError, load_recipe

        try:
            recipe = load_recipe(recipe_path)
        except RecipeError as e:
            report["recipe"] = {"path": recipe_path, "ok": False, "why": str(e)}
            return report, 1
        target = report["targets"][recipe.target]
        ok = bool(target["compile"])
        report["recipe"] = {"path": recipe_path, "target": recipe.target, "ok": ok, "can_run": bool(target["run"]),
                            "why": target["why"] if not ok else "can compile here"}
        if not ok:
            code = 1
    return report, code


def print_doctor(report: dict[str, Any], console=None) -> None:
    """Render a doctor report with rich (to `console`, or a new one)."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console()
    facts = Table(title="graphgen doctor", show_header=False)
    for key in ("python", "torch", "transformers", "torch_npu", "torchair", "cann", "device_name", "import_order",
                "npugraph_ex", "npu_error", "cpu_kernels"):
        value = report.get(key)
        facts.add_row(key, "-" if value is None else escape(str(value)))
    facts.add_row("devices", ", ".join(f"{k}: {v}" for k, v in report["devices"].items()))
    console.print(facts)
    targets = Table(title="targets on this machine")
    for col in ("target", "compile", "run", "why"):
        targets.add_column(col)
    for name, t in report["targets"].items():
        mark = lambda ok: "[green]yes[/green]" if ok else "[red]no[/red]"  # noqa: E731
        targets.add_row(name, mark(t["compile"]), mark(t["run"]), escape(str(t["why"])))
    console.print(targets)
    rec = report.get("recipe")
    if rec:
        color = "green" if rec["ok"] else "red"
        console.print(f"[{color}]{escape(str(rec['path']))}: target {rec.get('target', '?')}: "
                      f"{escape(str(rec['why']))}[/{color}]")


def print_builds(rows: list[dict[str, Any]], console=None) -> None:
    """Render `build_caches()` rows with rich."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console()
    table = Table(title="per-machine build caches")
    for col in ("item", "ok", "seconds"):
        table.add_column(col)
    table.add_column("detail", overflow="fold")
    for row in rows:
        table.add_row(row["item"], "[green]yes[/green]" if row["ok"] else "[red]no[/red]", f"{row['seconds']:.1f}",
                      escape(row["detail"]))
    console.print(table)


__all__ = ["build_caches", "doctor", "print_builds", "print_doctor"]

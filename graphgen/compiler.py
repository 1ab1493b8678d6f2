"""The compile pipeline: recipe -> model -> canonical graph -> paged graphs -> lint -> backend -> artifact.

`compile_recipe(recipe)` runs the stages in order (DESIGN.md, data flow) and reports each one to an
optional `progress(stage, detail)` callback; the CLI turns those into a rich progress display.
With Inductor on the CPU, each phase graph's backend compile (tens of seconds, mostly Inductor and
g++) runs in a worker forked after its export, so the phases compile concurrently (`CompileWorkers`).
"""
from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import multiprocessing.connection
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.fx as fx
from safetensors.torch import load_file, save_file

from . import __version__
from .artifact import FORMAT_VERSION, MANIFEST, atomic_dir, graphgen_source_hash, read_manifest, write_manifest
from .backends import backend_module
from .capture.export import capture
from .capture.load import load_model
from .passes.lint import LintContext, LintReport, lint
from .passes.lm_head import MIN_HEAD_ELEMENTS, split_lm_head
from .passes.paged_attention import paged_attention, padded_head_dim, plain_graph_module
from .passes.rotary import tabulate_rotary
from .passes.sampled_rows import gather_sampled_rows_early
from .recipe import Recipe
from .spec import CPU_PHASES, DTYPES, PHASE_INPUTS, KVSpec, cache_input_names

Progress = Callable[[str, str], None]
WEIGHT_FILES = ("*.safetensors", "*.safetensors.index.json")
HF_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja")
# Parameters live under this attribute of capture's wrapper module; checkpoint keys lack it.
WRAPPER_PREFIX = "model."


class CompileError(RuntimeError):
    """The recipe cannot be compiled as asked; says why and what to change."""


@dataclass
class CompileResult:
    path: Path
    up_to_date: bool
    seconds: float
    graphs: dict[str, str] = field(default_factory=dict)  # phase -> file
    attention_rewritten: dict[str, int] = field(default_factory=dict)  # phase -> nodes
    lint: dict = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)  # file -> bytes


def _versions() -> dict[str, str]:
    import transformers

    return {
        "graphgen": __version__,
        "graphgen_source": graphgen_source_hash(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def _checkpoint_digest(recipe: Recipe) -> str:
    """For a local checkpoint, what its files are now (so an edited checkpoint rebuilds)."""
    path = recipe.model.resolved_path()
    if path is None or not path.is_dir():
        return ""
    h = hashlib.sha256()
    for p in sorted(path.iterdir()):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def build_key(recipe: Recipe) -> str:
    payload = {"recipe": recipe.normalized(), "versions": _versions(), "checkpoint": _checkpoint_digest(recipe),
               "format": FORMAT_VERSION}
    if recipe.target == "npu":  # compiled-graph caches are tied to CANN/torch_npu/torchair too
        from .backends.torchair import versions as npu_versions

        payload["npu_versions"] = npu_versions()
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _up_to_date(out: Path, key: str) -> bool:
    if not (out / MANIFEST).is_file():
        return False
    try:
        manifest = read_manifest(out, verify=True)
    except Exception:  # a broken artifact is rebuilt, not trusted
        return False
    return manifest.data.get("build_key") == key


def kv_spec_for(recipe: Recipe, model) -> KVSpec:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    n = config.num_attention_heads
    nkv = getattr(config, "num_key_value_heads", None) or n
    d = getattr(config, "head_dim", None) or config.hidden_size // n
    stored = d
    if d % 16:
        if recipe.head_dim_padding == "reject":
            raise CompileError(
                f"{recipe.source}: head_dim {d} is not a multiple of 16 and head_dim_padding is 'reject'; "
                "set head_dim_padding: pad (zero-padding is exact)"
            )
        stored = padded_head_dim(d)
    if recipe.kv_cache.dtype == "int8":
        raise CompileError(
            f"{recipe.source}: kv_cache.dtype int8 is not supported by the compile pipeline yet "
            "(the ops support int8 antiquant; calibrated KV scales are not built); use dtype: auto"
        )
    return KVSpec(
        num_layers=config.num_hidden_layers,
        num_kv_heads=nkv,
        head_dim=stored,
        model_head_dim=d,
        block_size=recipe.kv_cache.block_size,
        layout=recipe.kv_cache.layout,
        dtype=recipe.dtype,
        max_blocks_per_seq=math.ceil(recipe.limits.max_model_len / recipe.kv_cache.block_size),
    )


def _select_output(gm: fx.GraphModule, dim: int) -> None:
    """logits (1, K, V) -> (K, V) for prefill (dim 0); (B, 1, V) -> (B, V) for decode (dim 1)."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    (value,) = out.args
    with gm.graph.inserting_before(out):
        selected = gm.graph.call_function(torch.ops.aten.select.int, (value, dim, 0))
    out.args = (selected,)
    gm.recompile()


def _example_inputs(phase: str, spec: KVSpec, recipe: Recipe, device: torch.device) -> tuple[list, list]:
    """Example inputs (sizes >= 2 so export keeps dims dynamic) and their dynamic shapes."""
    num_blocks = 4
    nb = torch.export.Dim("num_blocks", min=2, max=1 << 24)
    pools = [torch.zeros(spec.pool_shape(num_blocks), dtype=DTYPES[spec.dtype], device=device)
             for _ in cache_input_names(spec.num_layers)]
    pool_dims = [{0: nb} for _ in pools]
    i64 = dict(dtype=torch.int64, device=device)
    lim = recipe.limits
    table = torch.zeros(2, spec.max_blocks_per_seq, dtype=torch.int32, device=device)
    t = torch.export.Dim("tokens", min=1, max=max(2, lim.max_num_batched_tokens))
    if phase == "prefill":
        s = torch.export.Dim("seqs", min=1, max=max(2, lim.max_num_seqs))
        ex = [torch.zeros(1, 8, **i64), torch.arange(8, **i64)[None], torch.tensor([3, 7], **i64),
              torch.tensor([4, 8], **i64), torch.arange(8, **i64)]
        dims = [{1: t}, {1: t}, {0: s}, {0: s}, {0: t}]
    elif phase == "mixed":
        s = torch.export.Dim("seqs", min=1, max=max(2, lim.max_num_seqs))
        k = torch.export.Dim("samples", min=1, max=max(2, lim.max_num_seqs))
        ex = [torch.zeros(1, 8, **i64), torch.tensor([[16, 17, 18, 19, 20, 0, 1, 2]], **i64),
              torch.tensor([4, 5, 7], **i64), torch.tensor([5, 8], **i64), table, torch.tensor([21, 3], **i64),
              torch.arange(8, **i64)]
        dims = [{1: t}, {1: t}, {0: k}, {0: s}, {0: s}, {0: s}, {0: t}]
    elif phase == "extend":
        ex = [torch.zeros(1, 8, **i64), torch.arange(16, 24, **i64)[None], torch.tensor([7], **i64), table[:1],
              torch.tensor([24], **i64), torch.arange(16, 24, **i64)]
        dims = [{1: t}, {1: t}, None, None, None, {0: t}]
    else:
        b = torch.export.Dim("batch", min=1, max=max(2, lim.max_num_seqs))
        ex = [torch.zeros(2, 1, **i64), torch.ones(2, 1, **i64), table, torch.tensor([2, 2], **i64),
              torch.tensor([1, 17], **i64)]
        dims = [{0: b}, {0: b}, {0: b}, {0: b}, {0: b}]
    return ex + pools, dims + pool_dims


def _in_use_order(gm: fx.GraphModule, fqns: list[str]) -> list[str]:
    """The graph constants `fqns` in the order `gm` first reads them (names it never reads last):
    the runtime lays the weights out in memory in this order (runtime/graphs.py)."""
    first: dict[str, int] = {}
    for i, node in enumerate(gm.graph.nodes):
        for arg in node.all_input_nodes:
            if arg.op == "get_attr":
                first.setdefault(arg.target, i)
    return sorted(fqns, key=lambda fqn: first.get(fqn, len(gm.graph.nodes)))


def _weight_map(gm: fx.GraphModule, fqns: list[str], checkpoint: dict[str, torch.Tensor]):
    """Map each graph constant to a checkpoint key (same tensor, or a tied copy), else keep it as
    an extra constant. Returns (map fqn -> ["model"|"constants", key], extra constants)."""
    own = dict(gm.named_parameters(remove_duplicate=False))
    own.update(gm.named_buffers(remove_duplicate=False))
    mapping, extra = {}, {}
    for fqn in fqns:
        tensor = own.get(fqn)
        if tensor is None:
            raise CompileError(f"graph constant {fqn} is not a parameter or buffer of the captured model")
        tensor = tensor.detach().cpu()  # the checkpoint's side (a no-op for a CPU build)
        key = fqn.removeprefix(WRAPPER_PREFIX)
        ck = checkpoint.get(key)
        if ck is not None and ck.shape == tensor.shape and torch.equal(ck.to(tensor.dtype), tensor):
            mapping[fqn] = ["model", key]
            continue
        tied = next((k for k, t in checkpoint.items() if t.shape == tensor.shape
                     and torch.equal(t.to(tensor.dtype), tensor)), None)
        if tied is not None:
            mapping[fqn] = ["model", tied]
        else:
            mapping[fqn] = ["constants", fqn]
            extra[fqn] = tensor.contiguous()
    return mapping, extra


def _load_checkpoint_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    return tensors


def _copy_checkpoint(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True)
    for pattern in (*WEIGHT_FILES, *HF_FILES):
        for path in src.glob(pattern):
            shutil.copy2(path, dst / path.name)


def _special_tokens(model, tokenizer) -> dict:
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    if eos is None:
        eos = model.config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    return {"bos": tokenizer.bos_token_id, "eos": eos_ids, "pad": tokenizer.pad_token_id}


# A backend compile's own working set besides the weights (Inductor's Python, g++ on the wrapper).
WORKER_OVERHEAD_BYTES = 1 << 30


def compile_jobs(graphs: int, weight_bytes: int, *, cpus: int | None, available: int | None) -> int:
    """How many graphs to compile at once: one per graph, at most one more than the cores (a
    compile alternates between Inductor's Python and g++, so a third job fills the gaps on two
    cores), and only as many as fit, at weights plus WORKER_OVERHEAD_BYTES each, in half of the
    `available` memory (bytes; a fork may come to copy the weights). 1 (serial) when unknown."""
    if not cpus or not available:
        return 1
    by_memory = available // 2 // (weight_bytes + WORKER_OVERHEAD_BYTES)
    return max(1, min(graphs, cpus + 1, by_memory))


def _parallel_jobs(backend, device: torch.device, model: torch.nn.Module) -> int:
    """Inductor for the CPU compiles the phase graphs in forked workers (a fork cannot use CUDA);
    every other backend compiles here, one graph after another."""
    if backend.FORMAT != "aoti" or device.type != "cpu" or "fork" not in multiprocessing.get_all_start_methods():
        return 1
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return compile_jobs(len(CPU_PHASES), _weight_bytes(model), cpus=cpus, available=_mem_available())


def _mem_available() -> int | None:
    """MemAvailable from /proc/meminfo in bytes; None where there is none (not Linux)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _weight_bytes(model: torch.nn.Module) -> int:
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def _compile_in_worker(save, ep, path: Path, threads: int, conn) -> None:
    """Runs in the forked child: compile, send back ("ok", constant names) or ("error", traceback
    text; exceptions need not pickle). Prints nothing through the parent's rich console."""
    try:
        torch.set_num_threads(1)  # GNU OpenMP is not fork-safe once the parent used its pool
        # ...but the code is generated for the parent's threads: Inductor sizes its kernels' OpenMP
        # regions by torch.get_num_threads() (config cpp.threads would always write a fixed count).
        torch.get_num_threads = lambda: threads
        sys.stdout = sys.stderr  # the parent's progress spinner may have held stdout's lock at the fork
        conn.send(("ok", save(ep, path)))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


class CompileWorkers:
    """Backend compiles of the phase graphs in processes forked from this one (Linux 'fork': no
    re-import of torch, the ExportedProgram is not serialized), at most `jobs` at a time, while
    the caller goes on exporting the next phase. Leaving the `with` kills what still runs."""

    def __init__(self, jobs: int, say: Progress):
        self.jobs, self.say = jobs, say
        self.running: dict[str, tuple[multiprocessing.Process, multiprocessing.connection.Connection, float]] = {}
        self.done: dict[str, list[str]] = {}
        self.order: list[str] = []

    def submit(self, phase: str, save, ep: torch.export.ExportedProgram, path: Path) -> None:
        """Fork a worker that runs `save(ep, path)` (a backend's save) and keeps its result."""
        self._collect(timeout=0)
        while len(self.running) >= self.jobs:
            self._collect(timeout=None)
        ctx = multiprocessing.get_context("fork")
        recv, send = ctx.Pipe(duplex=False)
        args = (save, ep, path, torch.get_num_threads(), send)
        process = ctx.Process(target=_compile_in_worker, args=args, name=f"graphgen-compile-{phase}")
        process.start()
        send.close()  # the child holds the only write end: its death reads as EOF here
        self.running[phase] = (process, recv, time.perf_counter())
        self.order.append(phase)

    def results(self) -> dict[str, list[str]]:
        """Wait for every submitted compile; phase -> the constant names `save` returned, in
        submission order. Raises CompileError naming the phase of the first failure."""
        while self.running:
            self._collect(timeout=None)
        return {phase: self.done[phase] for phase in self.order}

    def _collect(self, timeout: float | None) -> None:
        conns = {conn: phase for phase, (_, conn, _) in self.running.items()}
        for conn in multiprocessing.connection.wait(list(conns), timeout):
            phase = conns[conn]
            process, _, started = self.running.pop(phase)
            try:
                status, payload = conn.recv()
            except EOFError:
                status, payload = "died", None
            conn.close()
            process.join()
            if status == "died":
                raise CompileError(f"{phase}: the backend compile worker (pid {process.pid}) died without a "
                                   f"result, exit code {process.exitcode} (a negative code is the signal; "
                                   "-9 is often the out-of-memory killer)")
            if status == "error":
                raise CompileError(f"{phase}: backend compile failed in its worker process:\n{payload}")
            self.done[phase] = payload
            self.say("backend", f"{phase}: compiled in {time.perf_counter() - started:.1f}s")

    def __enter__(self) -> "CompileWorkers":
        return self

    def __exit__(self, *exc) -> None:
        for process, conn, _ in self.running.values():
            process.kill()
            process.join()
            conn.close()
        self.running.clear()


def compile_recipe(
    recipe: Recipe, *, output: str | Path | None = None, target: str | None = None, force: bool = False,
    progress: Progress | None = None,
) -> CompileResult:
    """Build (or find up to date) the artifact of `recipe`; see the module docstring."""
    say = progress or (lambda stage, detail: None)
    start = time.perf_counter()
    if target is not None and target != recipe.target:
        data = recipe.normalized()
        data["target"] = target
        data["compile"]["backend"] = None
        data["compile"]["torchair"] = None
        recipe = type(recipe).model_validate(data)
    out = Path(output) if output is not None else recipe.output_dir
    npu = None  # target npu: lowering to torch.ops.npu.* and torchair (backends/torchair.py)
    if recipe.target == "npu":
        from .backends import torchair as npu_backend

        try:
            npu = npu_backend.NpuBuild.plan(recipe)
        except npu_backend.TorchairError as e:
            raise CompileError(f"{recipe.source}: {e}") from None
    device = torch.device("cuda" if recipe.target == "cuda" else "cpu")
    key = build_key(recipe)
    if not force and _up_to_date(out, key):
        say("up to date", f"{out} matches the recipe and versions; nothing to do (--force rebuilds)")
        return CompileResult(path=out, up_to_date=True, seconds=time.perf_counter() - start)

    backend = backend_module(recipe.compile.backend)
    backend_ready = backend.prepare(device, say) if hasattr(backend, "prepare") else lambda: None
    result = CompileResult(path=out, up_to_date=False, seconds=0.0)
    with tempfile.TemporaryDirectory(prefix="graphgen-build-") as work, atomic_dir(out) as root:
        say("load", f"model from {recipe.model.source}")
        model, tokenizer, checkpoint = load_model(recipe.model, recipe.dtype, work)
        model.to(device)
        spec = kv_spec_for(recipe, model)
        lim = recipe.limits

        say("capture", "torch.export (non-strict), canonical attention nodes")
        # The paged graphs get their own dims on re-export (prefill packs up to
        # max_num_batched_tokens tokens of several sequences into one row).
        ep, record = capture(model, max_batch=lim.max_num_seqs, max_seq_len=lim.max_model_len)

        _copy_checkpoint(checkpoint, root / "model")
        ckpt = _load_checkpoint_tensors(root / "model")
        (root / "graphs").mkdir()
        lowered, extra_constants, graphs, modules = [], {}, {}, {}
        jobs = _parallel_jobs(backend, device, model)
        backend_ready()
        with CompileWorkers(jobs, say) as workers:
            phases = npu.phases if npu is not None else CPU_PHASES
            for phase, inputs in PHASE_INPUTS.items():
                if phase not in phases:
                    if npu is not None:
                        say("passes", npu.notes[phase])
                    continue
                say("passes", f"{phase}: paged attention rewrite")
                gm, rec = paged_graph_module(ep, phase, spec)
                result.attention_rewritten[phase] = rec.matched
                if npu is None:  # cpu/cuda: Inductor would recompute cos/sin in every layer
                    rotary = tabulate_rotary(gm, lim.max_model_len)
                    if rotary.tabulated or rotary.skipped:
                        say("passes", f"{phase}: rotary cos/sin: {len(rotary.tabulated)} tables of "
                                      f"{lim.max_model_len} positions" + "".join(f"; kept {s}" for s in rotary.skipped))
                # cpu: the runtime applies the LM head, where it knows when a step is greedy
                head = None
                if npu is None and device.type == "cpu" and recipe.graphs.lm_head != "graph":
                    least = 0 if recipe.graphs.lm_head == "runtime" else MIN_HEAD_ELEMENTS
                    head = split_lm_head(gm, min_elements=least)
                if head:
                    say("passes", f"{phase}: LM head {head} applied by the runtime (greedy steps: greedy_head)")
                ex, dims = _example_inputs(phase, spec, recipe, device)
                with torch.no_grad():
                    paged = torch.export.export(gm, tuple(ex), dynamic_shapes=dims, strict=False)
                if phase != "mixed":  # built for cpu/cuda only: the NPU graph-mode lint has no say on it
                    lowered.append(paged.graph_module)
                rel = f"graphs/{phase}.pt2"
                graphs[phase] = {
                    "file": rel,
                    "format": backend.FORMAT,
                    "inputs": inputs + cache_input_names(spec.num_layers),
                    "outputs": ["hidden" if head else "logits"],
                    "weights": None,  # filled in below, once the backend says which constants it kept
                }
                if head:
                    graphs[phase]["head"] = {"weight": head}  # mapped to the checkpoint below
                modules[phase] = gm
                if npu is not None:
                    say("backend", f"{phase}: {recipe.compile.backend}")
                    rel, fqns, npu_entry, lowered[-1:] = npu.save(paged, phase, root, graphs[phase]["inputs"], spec)
                    graphs[phase].update(file=rel, weights=fqns)
                    graphs[phase].update(npu_entry)
                elif jobs > 1:
                    say("backend", f"{phase}: {recipe.compile.backend} (compiling in parallel, {jobs} workers)")
                    workers.submit(phase, backend.save, paged, root / rel)
                else:
                    say("backend", f"{phase}: {recipe.compile.backend}")
                    graphs[phase]["weights"] = backend.save(paged, root / rel)
                result.graphs[phase] = rel
            for phase, fqns in workers.results().items():
                graphs[phase]["weights"] = fqns
        for phase, entry in graphs.items():
            entry["weights"], extra = _weight_map(modules[phase], _in_use_order(modules[phase], entry["weights"]), ckpt)
            extra_constants.update(extra)
            if "head" in entry:
                mapping, extra = _weight_map(modules[phase], [entry["head"]["weight"]], ckpt)
                entry["head"]["weight"] = next(iter(mapping.values()))  # [source, key], as the graph's weights
                extra_constants.update(extra)
        graphs["decode"]["batch_sizes"] = list(recipe.graphs.decode_batch_sizes)
        prefill = recipe.graphs.prefill
        graphs["prefill"]["token_buckets"] = None if prefill == "varlen" else list(prefill.buckets)
        if npu is not None:
            npu.finish(graphs)
        if extra_constants:
            save_file(extra_constants, str(root / "graphs" / "constants.safetensors"))

        say("lint", "graph-mode constraints of the NPU ops")
        ctx = LintContext(
            target=recipe.target, dtype=DTYPES[recipe.dtype], block_size=spec.block_size,
            kv_dtype=recipe.kv_cache.dtype, prefill="varlen" if prefill == "varlen" else "buckets",
            attention_ops=recipe.attention_ops, head_dim_padding=recipe.head_dim_padding,
        )
        report = lint([ep.graph_module, *lowered], npu.lint_context(ctx) if npu is not None else ctx)
        if npu is not None and not report.npu_expressible:
            raise CompileError(f"{recipe.source}: target npu, but the graphs break NPU graph-mode rules:\n  "
                               + "\n  ".join(f.line() for f in report.errors()))
        (root / "report").mkdir()
        (root / "report" / "lint.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        result.lint = _lint_summary(report)

        say("package", f"manifest and checksums -> {out}")
        manifest = write_manifest(root, {
            "name": recipe.name,
            "build_key": key,
            "recipe": recipe.normalized(),
            "model_config": model.config.to_dict(),
            "versions": _versions(),
            "target": recipe.target,
            "device": npu.device if npu is not None else device.type,
            "dtype": recipe.dtype,
            "kv": spec.to_dict(),
            "limits": lim.model_dump(),
            "graphs": graphs,
            "model_dir": "model",
            "constants_file": "graphs/constants.safetensors" if extra_constants else None,
            "special_tokens": _special_tokens(model, tokenizer),
            "npu_portable": report.npu_expressible,
            "capture": {"attention_nodes": len(record.attention)},
        })
        result.sizes = {rel: (root / rel).stat().st_size for rel in manifest.data["files"]}
    result.seconds = time.perf_counter() - start
    return result


def paged_graph_module(ep: torch.export.ExportedProgram, phase: str, spec: KVSpec, *, sampled_rows_only: bool = True):
    """The canonical program as the `phase` graph (eager GraphModule, inputs per PHASE_INPUTS and
    the pools), before re-export: what the backends compile and what pass tests run directly.
    sampled_rows_only=False keeps every row through the last layer (verify --layers taps each
    layer's output for all rows)."""
    gm = plain_graph_module(ep)
    if "logits_indices" in PHASE_INPUTS[phase]:
        _add_logits_indices(gm)
    gm, record = paged_attention(gm, phase, spec)
    _select_output(gm, 1 if phase == "decode" else 0)
    if sampled_rows_only:
        gather_sampled_rows_early(gm)
    return gm, record


def _add_logits_indices(gm: fx.GraphModule) -> None:
    """Prefill packs all sequences into one row: compute logits only at each sequence's last
    token. Adds input `logits_indices` (K,) and gathers the hidden states before the LM head."""
    from .passes.paged_attention import _add_inputs

    idx = _add_inputs(gm, ["logits_indices"])["logits_indices"]
    head = _lm_head(gm)
    hidden = head.args[0]
    with gm.graph.inserting_before(head):
        picked = gm.graph.call_function(torch.ops.aten.index_select.default, (hidden, 1, idx))
    head.replace_input_with(hidden, picked)
    gm.recompile()


def _lm_head(gm: fx.GraphModule) -> fx.Node:
    """The last linear before the output: the LM head (softcaps and scalings may follow it)."""
    linears = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in (
        torch.ops.aten.linear.default, torch.ops.aten.matmul.default, torch.ops.aten.mm.default)]
    if not linears:
        raise CompileError("no LM head (final linear) found in the captured graph")
    return linears[-1]


def _lint_summary(report: LintReport) -> dict:
    return {
        "npu_expressible": report.npu_expressible,
        "errors": len(report.errors()),
        "findings": [f.line() for f in report.findings],
    }


__all__ = ["CompileError", "CompileResult", "build_key", "compile_recipe", "kv_spec_for", "paged_graph_module"]

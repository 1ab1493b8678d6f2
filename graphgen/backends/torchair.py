"""torchair backend (target npu): NPU-lowered graphs compiled with `torch.compile` and torchair.

Build (`build_phase`, called by the compiler): the paged graph is lowered to torch.ops.npu.*
(passes/npu_lowering.py); prefill once per bucket (its lengths are constants), decode and extend
once. Each lowered GraphModule is saved with its weights stripped (`graphs/<phase>/*.pt`, bound
from the artifact's checkpoint at load) beside `index.json` (buckets, options, versions).

Load (`load`): one compiled callable per bucket, behind an `NpuGraph` that picks the bucket from
the input shape and refuses any shape no bucket covers (never an eager fallback), rebuilds the
host length list from `seq_lens` at every call, and marks pools, block tables and fixed-size
inputs static. Compilation:
- torchair max-autotune / reduce-overhead: `torchair.inference.cache_compile(module.forward,
  config=CompilerConfig, dynamic=..., cache_dir=graphs/torchair_cache/<phase>_<bucket>_nb<blocks>)`,
  which compiles with `get_npu_backend(compiler_config=config)` and persists the GE graph;
- npugraph_ex: `torch.compile(module, backend="npugraph_ex")` (no persistence);
- the stand-in (`STAND_IN`, env GRAPHGEN_TORCHAIR_STAND_IN = eager | inductor): the same
  `torch.compile` call with that backend, so the whole path runs on CPU under graphgen.ops.emulate().
  The inductor stand-in swaps npu_scatter_nd_update_ for graphgen::kv_cache_scatter_ (same write):
  aot_autograd cannot functionalize an alias-returning custom op in torch 2.13, while torchair
  converts npu_scatter_nd_update_ itself.
Decode: dynamic=True (SymInt lengths), every tensor input static, `tiling_schedule_optimize` as
the recipe says. Prefill: dynamic=False (static shapes, constant lengths).
"""
from __future__ import annotations

import importlib
import inspect
import json
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.fx as fx

FORMAT = "torchair"
STAND_IN_ENV = "GRAPHGEN_TORCHAIR_STAND_IN"
STAND_INS = ("eager", "inductor")
# None: real torchair. "eager" | "inductor": the same torch.compile call with that backend.
STAND_IN: str | None = os.environ.get(STAND_IN_ENV) or None
CACHE_DIR = "torchair_cache"
REBUILD = "graphgen compile <recipe> --target npu --force"
HOST_LENGTHS = {"decode": ("seq_lens_host", "seq_lens"), "extend": ("seq_lens_host", "seq_lens")}


class TorchairError(RuntimeError):
    """The NPU path cannot run here as asked; the message says why and what to do."""


class UncoveredBatchError(TorchairError):
    """A shape no compiled bucket covers: refused, never run eagerly in silence."""


# --- environment facts ------------------------------------------------------------------------
def _version_of(name: str) -> str | None:
    mod = sys.modules.get(name)
    if mod is None:
        try:
            mod = importlib.import_module(name)
        except Exception:  # noqa: BLE001  (absent, or present but broken: both mean unusable here)
            return None
    return str(getattr(mod, "__version__", "unknown"))


def cann_version() -> str | None:
    """The CANN toolkit version from the install's version files (None when no toolkit is found)."""
    roots = [os.environ.get(k) for k in ("ASCEND_TOOLKIT_HOME", "ASCEND_HOME_PATH", "ASCEND_OPP_PATH")]
    roots += ["/usr/local/Ascend/ascend-toolkit/latest", "/usr/local/Ascend/cann"]
    for root in filter(None, roots):
        for name in ("version.cfg", "ascend_toolkit_install.info", "compiler/version.info", "version.info"):
            path = Path(root) / name
            if path.is_file():
                for line in path.read_text(errors="replace").splitlines():
                    key, _, value = line.partition("=")
                    if key.strip() in ("version", "toolkit_version", "Version") and value.strip():
                        return value.strip().strip('"[]')
    return None


def import_order_ok() -> bool | None:
    """Whether torch_npu was imported before torchair (None when torchair is not imported).
    sys.modules keeps insertion order, which is import order."""
    names = list(sys.modules)
    if "torchair" not in names:
        return None
    return "torch_npu" in names and names.index("torch_npu") < names.index("torchair")


def import_torchair():
    """torch_npu first, then torchair (the other order silently leaves graph mode off)."""
    if import_order_ok() is False:
        raise TorchairError("torchair was imported before torch_npu, so graph mode does not engage: "
                            "import torch_npu first (graphgen does this for you if you let it import torchair)")
    try:
        importlib.import_module("torch_npu")
        return importlib.import_module("torchair")
    except ImportError as e:
        raise TorchairError(f"torch_npu/torchair are not importable ({e}); install them on an Ascend machine with "
                            f"`pip install 'graphgen[npu]'` (torchair ships with torch_npu), or set "
                            f"{STAND_IN_ENV}=eager to run the NPU-lowered graphs emulated on CPU") from None


def versions() -> dict[str, str | None]:
    """The versions a compiled-graph cache depends on."""
    return {"torch": torch.__version__, "torch_npu": _version_of("torch_npu"), "torchair": _version_of("torchair"),
            "cann": cann_version()}


def stand_in() -> str | None:
    if STAND_IN is not None and STAND_IN not in STAND_INS:
        raise TorchairError(f"{STAND_IN_ENV}={STAND_IN!r}: use one of {', '.join(STAND_INS)} (or unset it)")
    return STAND_IN


# --- configuration ----------------------------------------------------------------------------
def _opt(options: Any, name: str, default=None):
    if options is None:
        return default
    if isinstance(options, dict):
        return options.get(name, default)
    return getattr(options, name, default)


def compiler_config(options: Any, torchair_module=None, *, dump_dir: str | Path | None = None):
    """torchair.CompilerConfig from a recipe's `compile.torchair` options (model or dict)."""
    tng = torchair_module or import_torchair()
    config = tng.CompilerConfig()
    mode = _opt(options, "mode", "max-autotune")
    if mode in ("max-autotune", "reduce-overhead"):
        config.mode = mode
    config.experimental_config.frozen_parameter = bool(_opt(options, "frozen_parameter", False))
    config.experimental_config.tiling_schedule_optimize = bool(_opt(options, "tiling_schedule_optimize", False))
    dump = _opt(options, "graph_dump")
    if dump:
        config.debug.graph_dump.type = dump
        if dump_dir is not None:
            config.debug.graph_dump.path = str(dump_dir)
    return config


def raise_cache_limit(num_graphs: int) -> int:
    """Dynamo keeps at most cache_size_limit compiled entries per code object: one per bucket here."""
    import torch._dynamo.config as dc

    want = max(8, 2 * num_graphs + 4)
    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(dc, name) and getattr(dc, name) < want:
            setattr(dc, name, want)
    return want


# --- saving: each lowered graph as Python source (no pickle) plus its attribute table -------------
# Names the generated source may use; `device` is rebound at load to the device the graph runs on,
# so devices captured at export (device(type='cpu')) follow the artifact to the NPU.
SOURCE_GLOBALS = ("inf", "nan", "NoneType", "torch", "device", "fx_pytree", "pytree")


def graph_source(gm: fx.GraphModule) -> tuple[str, dict[str, str]]:
    """(forward source, {attribute: "parameter" | "buffer"}) of a lowered GraphModule."""
    code = gm.graph.python_code(root_module="self")
    extra = sorted(set(code.globals) - set(SOURCE_GLOBALS))
    if extra:
        raise TorchairError(f"lowered graph uses globals {extra} that cannot be saved as source")
    if any(n.op == "call_module" for n in gm.graph.nodes):
        raise TorchairError("lowered graph calls submodules; expected a flat exported graph")
    params = dict(gm.named_parameters(remove_duplicate=False))
    attrs = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            attrs[node.target] = "parameter" if node.target in params else "buffer"
    return code.src, attrs


def save_graphs(graph_dir: Path, phase: str, graphs: dict[int | None, fx.GraphModule], index: dict) -> list[str]:
    """Write each lowered graph's source and index.json; return the constant names it reads
    (weights live once, in the artifact's checkpoint)."""
    graph_dir.mkdir(parents=True, exist_ok=True)
    names: set[str] = set()
    files, attributes = {}, {}
    for bucket, gm in graphs.items():
        src, attrs = graph_source(gm)
        rel = "graph.py" if bucket is None else f"graph_{bucket}.py"
        (graph_dir / rel).write_text(f"# graphgen NPU-lowered {phase} graph ({'all sizes' if bucket is None else bucket})"
                                     f"; generated, do not edit{src}")
        key = "all" if bucket is None else str(bucket)
        files[key], attributes[key] = rel, attrs
        names.update(attrs)
    (graph_dir / "index.json").write_text(json.dumps({**index, "phase": phase, "files": files,
                                                      "attributes": attributes}, indent=2) + "\n")
    return sorted(names)


def build_module(source: str, attrs: dict[str, str], constants: dict[str, torch.Tensor], *, device, name: str,
                 frozen_parameter: bool = False) -> torch.nn.Module:
    """An nn.Module running `source` (a saved forward) with its attributes bound from `constants`."""
    import math

    import torch.fx._pytree as fx_pytree
    import torch.utils._pytree as pytree

    run_device = torch.device(device)
    scope = {"inf": math.inf, "nan": math.nan, "NoneType": type(None), "torch": torch,
             "device": lambda *a, **k: run_device, "fx_pytree": fx_pytree, "pytree": pytree}
    exec(compile(source, f"<graphgen {name}>", "exec"), scope)  # noqa: S102  (our own checksummed source)
    module = type(name, (torch.nn.Module,), {"forward": scope["forward"]})()
    for qualname, kind in attrs.items():
        if qualname not in constants:
            raise TorchairError(f"graph constant {qualname} is missing from the artifact's weights; rebuild: {REBUILD}")
        value = constants[qualname]
        if frozen_parameter and not value.is_contiguous():
            raise TorchairError(f"frozen_parameter=True with non-contiguous {qualname} (stride {tuple(value.stride())}):"
                                " torchair gives wrong results then; make it contiguous or set frozen_parameter: false")
        *path, leaf = qualname.split(".")
        owner = module
        for part in path:
            if not hasattr(owner, part):
                owner.add_module(part, torch.nn.Module())
            owner = getattr(owner, part)
        if kind == "parameter":
            owner.register_parameter(leaf, torch.nn.Parameter(value, requires_grad=False))
        else:
            owner.register_buffer(leaf, value)
    return module


def secure_cache(root: Path) -> None:
    """cache_compile loads only files owned by the current user with mode 0600."""
    for path in sorted(root.rglob("*")):
        path.chmod(0o700 if path.is_dir() else 0o600)


def check_cache(root: Path) -> None:
    """Refuse a cache torchair would silently discard (and recompile): wrong owner or mode."""
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        st = path.stat()
        if st.st_uid != os.getuid() or st.st_mode & 0o777 != 0o600:
            raise TorchairError(f"{path}: torchair loads its cache only from files owned by the current user with "
                                f"mode 0600 (this one: uid {st.st_uid}, mode {oct(st.st_mode & 0o777)}); "
                                f"run `chmod -R u=rwX,go= {root}` as the owner, or rebuild: {REBUILD}")


def check_versions(recorded: dict, current: dict, where: Path) -> None:
    """A compiled-graph cache is valid only for the CANN/torch/torch_npu/torchair it was built with."""
    diff = {k: (recorded.get(k), current.get(k)) for k in ("cann", "torch", "torch_npu", "torchair")
            if recorded.get(k) != current.get(k)}
    if diff:
        said = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in diff.items())
        raise TorchairError(f"{where}: compiled graphs were cached with other versions ({said}); they do not carry "
                            f"across versions: rebuild with `{REBUILD}`")


# --- loading and running ----------------------------------------------------------------------
def _inductor_source(source: str) -> str:
    """The inductor stand-in's one change: the KV write as its functionalizable twin (same write)."""
    return source.replace("torch.ops.npu.npu_scatter_nd_update_.default", "torch.ops.graphgen.kv_cache_scatter_.default")


def _compile(module: torch.nn.Module, options: Any, *, dynamic: bool, cache_dir: Path | None) -> Callable:
    """The one torch.compile call of a bucket (or its cache_compile form on the device)."""
    standin = stand_in()
    if standin is not None:
        return torch.compile(module, backend=standin, dynamic=dynamic, fullgraph=True)
    tng = import_torchair()
    mode = _opt(options, "mode", "max-autotune")
    if mode == "npugraph_ex":
        if "npugraph_ex" not in torch._dynamo.list_backends(exclude_tags=()):
            raise TorchairError("compile.torchair.mode npugraph_ex: this torchair has no npugraph_ex backend; "
                                "upgrade torch_npu or use mode max-autotune")
        return torch.compile(module, backend="npugraph_ex", dynamic=dynamic, fullgraph=True)
    config = compiler_config(options, tng)
    return cache_compile(tng, module.forward, config=config, dynamic=dynamic, cache_dir=cache_dir)


def cache_compile(tng, method, *, config, dynamic: bool, cache_dir: Path | None):
    """torchair.inference.cache_compile; older torchair names the directory `root`."""
    fn = tng.inference.cache_compile
    params = inspect.signature(fn).parameters
    where = "cache_dir" if "cache_dir" in params or "root" not in params else "root"
    kwargs = {"config": config, "dynamic": dynamic}
    if cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        kwargs[where] = str(cache_dir)
    return fn(method, **kwargs)


@dataclass
class NpuGraph:
    """The compiled buckets of one phase. Called like any graph: the manifest's inputs, then the pools."""

    phase: str
    buckets: list[int] | None  # decode: batch sizes; prefill: token counts; extend: None (one graph)
    modules: dict[int | None, torch.nn.Module]
    options: Any
    cache_root: Path | None
    input_names: list[str]
    compiled: dict[int | None, Callable] = field(default_factory=dict)
    calls: dict[int | None, int] = field(default_factory=dict)

    def bucket_of(self, inputs: tuple) -> int | None:
        if self.buckets is None:
            return None
        size = inputs[0].shape[0] if self.phase == "decode" else inputs[0].shape[1]
        if size not in self.modules:
            what = "batch size" if self.phase == "decode" else "token count"
            key = "graphs.decode_batch_sizes" if self.phase == "decode" else "graphs.prefill.buckets"
            raise UncoveredBatchError(
                f"{self.phase}: no compiled graph for {what} {size} (compiled: {self.buckets}); refusing to run it "
                f"eagerly (that is a silent ~7x slowdown on NPU): pad to a bucket or add {size} to {key} and recompile")
        return size

    def _static(self, args: tuple) -> None:
        fixed_batch = self.phase == "decode"
        for name, value in zip(self.input_names, args):
            if isinstance(value, torch.Tensor) and (fixed_batch or name == "block_table" or "_cache_" in name):
                torch._dynamo.mark_static(value)

    def _host_lengths(self, args: tuple) -> tuple:
        if self.phase not in HOST_LENGTHS:
            return args
        _, source = HOST_LENGTHS[self.phase]
        # Rebuilt from the tensor at every call: a cached host list goes stale after advance_step.
        lengths = args[self.input_names.index(source)].tolist()
        return (*args, lengths)

    def __call__(self, *args):
        bucket = self.bucket_of(args)
        fn = self.compiled.get(bucket)
        if fn is None:
            fn = self.compiled[bucket] = self._compile(bucket, args)
        self._static(args)
        self.calls[bucket] = self.calls.get(bucket, 0) + 1
        return fn(*self._host_lengths(args))

    def _compile(self, bucket, args) -> Callable:
        cache = None
        if self.cache_root is not None:
            pools = [a for n, a in zip(self.input_names, args) if "_cache_" in n]
            nb = pools[0].shape[0] if pools else 0
            cache = self.cache_root / f"{self.phase}_{'all' if bucket is None else bucket}_nb{nb}"
        return _compile(self.modules[bucket], self.options, dynamic=self.phase != "prefill", cache_dir=cache)

    def warm_up(self, pools: list[torch.Tensor], scratch_block: int, block_size: int, max_blocks: int) -> None:
        """Compile (or load from the cache) every bucket now, before serving; all writes go to the
        scratch block. The extend graph compiles on first use (its token count varies)."""
        if self.buckets is None:
            return
        for b in self.buckets:
            args = bucket_args(self.phase, b, scratch_block, block_size, max_blocks, pools[0].device)
            self(*args, *pools)


def bucket_args(phase: str, size: int, scratch_block: int, block_size: int, max_blocks: int, device) -> tuple:
    """Inputs (before the pools) of a `size` bucket whose tokens all live in the scratch block."""
    i64 = dict(dtype=torch.int64, device=device)
    base = scratch_block * block_size
    if phase == "decode":
        table = torch.full((size, max_blocks), scratch_block, dtype=torch.int32, device=device)
        return (torch.zeros(size, 1, **i64), torch.zeros(size, 1, **i64), table, torch.ones(size, **i64),
                torch.full((size,), base, **i64))
    pos = torch.arange(size, **i64)
    if phase == "prefill":
        return (torch.zeros(1, size, **i64), pos[None], torch.tensor([size - 1], **i64), torch.tensor([size], **i64),
                base + pos % block_size)
    table = torch.full((1, max_blocks), scratch_block, dtype=torch.int32, device=device)  # extend
    return (torch.zeros(1, size, **i64), pos[None], torch.tensor([size - 1], **i64), table,
            torch.tensor([size], **i64), base + pos % block_size)


def _index(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def load(path: Path, constants: dict[str, torch.Tensor]) -> NpuGraph:
    """An NpuGraph from a phase's index.json: each graph's saved source as an nn.Module, weights
    bound from `constants` (shared, not copied)."""
    path = Path(path)
    index = _index(path)
    standin = stand_in()
    if standin is None:
        import_torchair()  # registers torch.ops.npu.* (torch_npu) before the graphs are unpickled
        cache_root = path.parent.parent / CACHE_DIR
        if cache_root.is_dir() and any(cache_root.iterdir()):
            check_versions(index.get("versions", {}), versions(), cache_root)
            check_cache(cache_root)
    else:
        from ..ops import emulate

        emulate()
        cache_root = None
    frozen = bool(_opt(index.get("options"), "frozen_parameter", False))
    device = next(iter(constants.values())).device if constants else torch.device("cpu")
    modules = {}
    for key, rel in index["files"].items():
        source = (path.parent / rel).read_text()
        if standin == "inductor":
            source = _inductor_source(source)
        # Decode: one saved graph (symbolic batch), one module and compiled graph per batch bucket.
        targets = index["buckets"] if key == "all" and index["phase"] == "decode" else [
            None if key == "all" else int(key)]
        for target in targets:
            modules[target] = build_module(source, index["attributes"][key], constants, device=device,
                                           frozen_parameter=frozen, name=f"NpuLowered_{index['phase']}_{target}")
    buckets = index.get("buckets")
    raise_cache_limit(len(modules))
    return NpuGraph(phase=index["phase"], buckets=buckets, modules=modules, options=index.get("options"),
                    cache_root=cache_root, input_names=list(index["inputs"]))


def export_air(module: torch.nn.Module, example_inputs: tuple, export_dir: Path, name: str, options: Any,
               torchair_module=None) -> Path:
    """An offline .air graph for `atc --framework=1` (max-autotune only; not with frozen_parameter)."""
    tng = torchair_module or import_torchair()
    if _opt(options, "frozen_parameter", False):
        raise TorchairError("export_air with frozen_parameter: torchair's dynamo_export does not support it; "
                            "set one of them to false")
    export_dir.mkdir(parents=True, exist_ok=True)
    tng.dynamo_export(*example_inputs, model=module, export_path=str(export_dir), export_name=name, dynamic=False,
                      config=compiler_config(options, tng))
    return export_dir / f"{name}.air"


def warn_stand_in() -> None:
    if STAND_IN is not None:
        warnings.warn(f"{STAND_IN_ENV}={STAND_IN}: NPU-lowered graphs run under torch.compile(backend={STAND_IN!r}) "
                      "with graphgen's emulated torch.ops.npu.* (no torchair, no device)", stacklevel=2)


__all__ = [
    "FORMAT", "STAND_IN", "STAND_IN_ENV", "NpuGraph", "TorchairError", "UncoveredBatchError", "cache_compile",
    "cann_version", "check_cache", "check_versions", "compiler_config", "export_air", "import_order_ok",
    "import_torchair", "load", "raise_cache_limit", "save_graphs", "secure_cache", "versions",
]


# --- building (called by the compiler; imports the passes lazily so loading never does) ---------
def default_prefill_buckets(max_model_len: int, max_num_batched_tokens: int) -> list[int]:
    """Token-count ladder for `graphs.prefill: varlen` on npu: 16, 32, 64, ... up to the cap."""
    cap = max(1, min(max_model_len, max_num_batched_tokens))
    sizes, size = [], 16
    while size < cap:
        sizes.append(size)
        size *= 2
    return sizes + [cap]


@dataclass
class NpuBuild:
    """What the compiler needs to build an npu artifact; see `plan`."""

    recipe: Any
    stand_in: str | None
    prefill_buckets: list[int]
    phases: list[str]
    notes: dict[str, str]
    versions: dict[str, str | None]

    @property
    def device(self) -> str:
        """Where the artifact runs: "npu", or "cpu" for a stand-in build (emulated ops)."""
        return "cpu" if self.stand_in is not None else "npu"

    @classmethod
    def plan(cls, recipe) -> "NpuBuild":
        """Check this machine can build for npu (torchair importable, or the stand-in set) and
        decide the prefill buckets and phases. Raises TorchairError saying what to do."""
        standin = stand_in()
        if standin is None:
            import_torchair()
        else:
            from ..ops import emulate

            emulate()
        lim = recipe.limits
        prefill = recipe.graphs.prefill
        notes = {}
        if prefill == "varlen":
            buckets = default_prefill_buckets(lim.max_model_len, lim.max_num_batched_tokens)
            notes["prefill"] = (f"graphs.prefill varlen on npu: PFA takes constant lengths, so prefill runs one "
                                f"sequence per call, padded to the buckets {buckets}")
        else:
            buckets = list(prefill.buckets)
        bs = recipe.kv_cache.block_size
        phases = ["prefill", "extend", "decode"]
        notes["mixed"] = ("no mixed graph on npu yet (cpu/cuda builds have one): its FIA would take TND query and "
                          "KV lengths as host int lists, which the lowering does not build; prefills and decodes "
                          "run as separate steps")
        if bs % 128 or bs > 512:
            phases.remove("extend")
            notes["extend"] = (f"no extend graph: FIA paged prefill (prefix-cache hits) needs kv_cache.block_size a "
                               f"multiple of 128 up to 512 (is {bs}); prefix-cache hits recompute their prompt")
        return cls(recipe=recipe, stand_in=standin, prefill_buckets=buckets, phases=phases, notes=notes,
                   versions=versions())

    def options(self) -> dict:
        opts = self.recipe.compile.torchair
        return opts.model_dump() if opts is not None else {}

    def save(self, paged_ep, phase: str, root: Path, input_names: list[str], spec):
        """Lower `paged_ep` for `phase` (per bucket for prefill), save it under graphs/<phase>/ and,
        when asked, an offline .air per graph. Returns (manifest file, constant names, manifest
        entry, lowered GraphModules for the lint)."""
        from ..passes.npu_lowering import npu_lowering
        from ..passes.paged_attention import plain_graph_module

        r = self.recipe
        bs = r.kv_cache.block_size
        keys: list[int | None] = list(self.prefill_buckets) if phase == "prefill" else [None]
        graphs = {}
        for key in keys:
            gm, _ = npu_lowering(plain_graph_module(paged_ep), phase, block_size=bs,
                                 attention_ops=r.attention_ops, prefill_tokens=key)
            graphs[key] = gm
        lowered = list(graphs.values())
        if _opt(self.options(), "export_air") and self.stand_in is None:
            from ..spec import DTYPES

            for key, gm in graphs.items():
                size = key or (2 if phase == "decode" else bs)
                pools = [torch.zeros(spec.pool_shape(2), dtype=DTYPES[spec.dtype])
                         for n in input_names if "_cache_" in n]
                args = (*bucket_args(phase, size, 0, bs, spec.max_blocks_per_seq, "cpu"), *pools)
                if phase in HOST_LENGTHS:
                    args = (*args, [1] * (size if phase == "decode" else 1))
                export_air(gm, args, root / "graphs" / "air", f"{phase}_{key or 'all'}", self.options())
        buckets = (list(self.prefill_buckets) if phase == "prefill"
                   else list(r.graphs.decode_batch_sizes) if phase == "decode" else None)
        index = {"buckets": buckets, "inputs": input_names, "attention_ops": r.attention_ops,
                 "options": self.options(), "versions": self.versions, "stand_in": self.stand_in,
                 "host_lengths": dict([HOST_LENGTHS[phase]]) if phase in HOST_LENGTHS else {}}
        fqns = save_graphs(root / "graphs" / phase, phase, graphs, index)
        entry = {"lowering": r.attention_ops, "npu_versions": self.versions, "stand_in": self.stand_in}
        if phase == "prefill":
            entry.update(token_buckets=list(self.prefill_buckets), packing="per_sequence")
        return f"graphs/{phase}/index.json", fqns, entry, lowered

    def finish(self, graphs: dict) -> None:
        """Manifest fields the generic compile loop sets otherwise."""
        graphs["prefill"]["token_buckets"] = list(self.prefill_buckets)
        graphs["prefill"]["packing"] = "per_sequence"

    def lint_context(self, ctx):
        from dataclasses import replace

        opts = self.options()
        return replace(ctx, prefill="buckets", torchair_mode=opts.get("mode", "max-autotune"),
                       frozen_parameter=bool(opts.get("frozen_parameter")), export_air=bool(opts.get("export_air")),
                       tiling_schedule_optimize=bool(opts.get("tiling_schedule_optimize")))

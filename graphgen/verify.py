"""Graph-vs-eager equivalence of an artifact, in tiers (DESIGN.md decision 6).

`verify_artifact(dir)` rebuilds the HF model from the artifact's own checkpoint (model/) with
transformers' "eager" attention, twice: in float64 (the reference) and in the artifact's dtype
(the eager baseline). The prompts run through both and through the artifact's runtime (`LLM`, its
scheduler, block manager, runner and advance step), whose sampler is swapped for a teacher that
records each step's logits and feeds the eager greedy token, so every step of every prompt is
compared on the same tokens. The first prompt runs one step alone and the others join after it, so
with two or more prompts every graph is compared: the prefill graph (the first prompt), the mixed
graph of cpu/cuda artifacts (the others' prompts beside the first one's decode row) and the
decode graph; `graph_steps` in the report counts the steps of each.

Tiers, each prompt's logits gated as PyTorch's compiled-vs-eager check (`torch._dynamo.utils.same`
with an fp64 reference) gates a whole output tensor:
  error(x) = RMSE(x - fp64 reference)
  pass  <=>  error(graph) <= MULTIPLIER[dtype] * error(eager) + FLOOR
1. prefill: the logits at each prompt's last token;
2. decode: the logits of steps 1..N-1 of each prompt together, teacher-forced on the eager greedy
   tokens (one tensor per prompt, as same() takes one output: at bf16 a single step's error is
   heavy-tailed, e.g. an MoE router near-tie flips an expert on one side). Each step also gets its
   own row (`decode_steps`, diagnostic); a failing prompt names its first step over its own limit;
3. tokens: the graph's greedy token at each step (argmax of its logits; with teacher forcing
   this is exactly the free-running greedy sequence up to the first divergence) vs the eager
   greedy tokens. Identical is required for the eager backend at float32. Otherwise (a compiled
   backend, or fp16/bf16, where the eager backend's fp32-accumulating attention is not bitwise
   HF's) the first divergence must be a near-tie: each side's token within the other's top-k
   logprobs; comparison stops there.

With `layers=True` the first decoder layer whose hidden state diverges is located. Method: the
paged graphs as the backend received them (capture of the same checkpoint -> paged prefill and
decode GraphModules, uncompiled) get every decoder layer's output as an extra graph output; they
run the prompt (prefill) and the teacher-forced tokens (decode) over a fresh pool and are compared
with forward hooks on the same layers of the eager and fp64 HF models, with the same gate. A
layer found there is a capture or pass error; none found while a tier fails means the backend
compiler introduced the difference.

The report (`VerifyReport.to_dict()`) is written to <artifact>/report/verify.json. That file is
outside the manifest's checksummed set on purpose: it is a statement about the artifact, written
after the build (and rewritten by every verify), not part of what the runtime loads; instead it
records the sha256 of the manifest it verified, which pins the files it speaks for.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .artifact import MANIFEST, read_manifest, sha256_file
from .spec import DTYPES

# PyTorch's same(): 3x for fp16/bf16 (and small tensors), 2x otherwise; floor = its default tol / 10.
MULTIPLIER = {"float32": 2.0, "float16": 3.0, "bfloat16": 3.0}
FLOOR = 1e-5
REPORT_FILE = "report/verify.json"
TIERS = ("prefill", "decode", "tokens")


class VerifyError(RuntimeError):
    """Verify cannot run as asked (prompts too long for the artifact, no tokenizer, ...)."""


@dataclass
class Row:
    """One compared row of logits (or of a layer's hidden states)."""

    prompt: int
    # 0 = prefill (last prompt token), s = decode step s. A prompt's decode row (all steps): its first
    # step over that step's own limit, else its worst. Layer rows: 0 prefill, 1 all decode steps.
    step: int
    graph_error: float  # RMSE(graph - fp64)
    eager_error: float  # RMSE(eager - fp64)
    limit: float  # MULTIPLIER * eager_error + FLOOR
    max_abs: float  # max |graph - eager|
    max_abs_fp64: float  # max |graph - fp64|
    passed: bool
    layer: int | None = None
    phase: str | None = None


@dataclass
class TokenRow:
    prompt: int
    eager: list[int]
    graph: list[int]  # up to and including the first divergence
    diverged_at: int | None
    near_tie: bool | None
    passed: bool
    detail: str = ""


@dataclass
class VerifyReport:
    artifact: str
    manifest_sha256: str
    backend: str
    dtype: str
    prompts: list[list[int]]
    max_new_tokens: int
    top_k: int
    exact_tokens: bool
    gate: dict
    prefill: list[Row] = field(default_factory=list)
    decode: list[Row] = field(default_factory=list)  # one per prompt, steps 1..N-1 together
    decode_steps: list[Row] = field(default_factory=list)  # one per (prompt, step): diagnostics
    tokens: list[TokenRow] = field(default_factory=list)
    layers: list[Row] | None = None  # only with layers=True
    graph_steps: dict = field(default_factory=dict)  # runtime steps per graph (prefill, decode, mixed)

    @property
    def tier_passed(self) -> dict[str, bool]:
        return {"prefill": all(r.passed for r in self.prefill), "decode": all(r.passed for r in self.decode),
                "tokens": all(r.passed for r in self.tokens)}

    @property
    def passed(self) -> bool:
        return all(self.tier_passed.values())

    @property
    def first_failure(self) -> dict | None:
        """The first failing tier, prompt and step (tiers in order); with layers, the first layer."""
        for tier in TIERS:
            bad = next((r for r in getattr(self, tier) if not r.passed), None)
            if bad is not None:
                out = {"tier": tier, "prompt": bad.prompt}
                if isinstance(bad, TokenRow):
                    out.update(step=bad.diverged_at, detail=bad.detail)
                else:
                    out.update(step=bad.step, graph_error=bad.graph_error, limit=bad.limit)
                layer = self.first_divergent_layer
                if layer is not None:
                    out["layer"] = layer.layer
                return out
        return None

    @property
    def first_divergent_layer(self) -> Row | None:
        bad = [r for r in self.layers or () if not r.passed]
        return min(bad, key=lambda r: (r.layer, r.phase != "prefill", r.prompt, r.step)) if bad else None

    def to_dict(self) -> dict:
        data = asdict(self)
        data["passed"] = self.passed
        data["tiers"] = self.tier_passed
        data["first_failure"] = self.first_failure
        layer = self.first_divergent_layer
        data["first_divergent_layer"] = None if layer is None else asdict(layer)
        return data


# --- the comparisons ------------------------------------------------------------------------------
def _rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.sqrt(torch.mean(torch.square(a.double() - b.double()))))


def compare(graph: torch.Tensor, eager: torch.Tensor, ref: torch.Tensor, dtype: str, **where: Any) -> Row:
    """Gate one row: graph and eager in the artifact's dtype, ref in float64."""
    g_err, e_err = _rmse(graph, ref), _rmse(eager, ref)
    limit = MULTIPLIER[dtype] * e_err + FLOOR
    diff = (graph.double() - eager.double()).abs().max()
    return Row(graph_error=g_err, eager_error=e_err, limit=limit, max_abs=float(diff),
               max_abs_fp64=float((graph.double() - ref.double()).abs().max()), passed=g_err <= limit, **where)


def compare_tokens(prompt: int, eager_tokens: list[int], graph_logits: torch.Tensor, eager_logits: torch.Tensor,
                   *, exact: bool, top_k: int) -> TokenRow:
    """graph_logits / eager_logits (N, V) of the same teacher-forced steps; eager_tokens their argmax."""
    graph_tokens = graph_logits.float().argmax(dim=-1).tolist()
    for step, (e, g) in enumerate(zip(eager_tokens, graph_tokens)):
        if e == g:
            continue
        g_top = graph_logits[step].float().log_softmax(-1).topk(top_k).indices.tolist()
        e_top = eager_logits[step].float().log_softmax(-1).topk(top_k).indices.tolist()
        near = e in g_top and g in e_top
        detail = (f"step {step}: graph {g}, eager {e}; eager's token in graph top-{top_k}: {e in g_top}, "
                  f"graph's token in eager top-{top_k}: {g in e_top}")
        passed = near and not exact
        if exact:
            detail += " (the eager backend at float32 must match exactly)"
        return TokenRow(prompt, eager_tokens, graph_tokens[:step + 1], step, near, passed, detail)
    return TokenRow(prompt, eager_tokens, graph_tokens, None, None, True)


# --- eager (HF) side --------------------------------------------------------------------------
def _hf_model(model_dir: Path, dtype: torch.dtype, device: torch.device, attn: str = "eager"):
    """The artifact's checkpoint as an HF model; the references use the eager experts loop too
    (fused grouped_mm MoE kernels have no float64)."""
    from transformers import AutoModelForCausalLM

    extra = {"experts_implementation": "eager"} if attn == "eager" else {}
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, attn_implementation=attn,
                                                 local_files_only=True, **extra)
    return model.to(device).eval().requires_grad_(False)


@torch.no_grad()
def _greedy(model, ids: list[int], n: int, device) -> tuple[list[int], torch.Tensor]:
    """n greedy tokens (argmax, lowest id on ties, as the runtime's sampler) and their logits (n, V)."""
    seq, rows = list(ids), []
    for _ in range(n):
        logits = model(input_ids=torch.tensor([seq], device=device), use_cache=False).logits[0, -1]
        rows.append(logits)
        seq.append(int(logits.float().argmax()))
    return seq[len(ids):], torch.stack(rows)


@torch.no_grad()
def _forward(model, ids: list[int], device, layer_modules: dict[int, str] | None = None):
    """Logits (S, V) and, with layer_modules (layer -> module path), each layer's output (S, H)."""
    hidden, handles = {}, []
    for layer, path in (layer_modules or {}).items():
        def hook(_module, _inputs, output, layer=layer):
            hidden[layer] = (output[0] if isinstance(output, (tuple, list)) else output)[0]
        handles.append(model.get_submodule(path).register_forward_hook(hook))
    try:
        logits = model(input_ids=torch.tensor([ids], device=device), use_cache=False).logits[0]
    finally:
        for h in handles:
            h.remove()
    return logits, hidden


# --- graph (artifact) side --------------------------------------------------------------------
class _TeacherSampler:
    """Stands in for the engine's Sampler: records each request's logits per step and returns the
    eager greedy token of that step. `index` maps request ids to prompt positions."""

    def __init__(self, tokens: list[list[int]]):
        self.tokens = tokens
        self.index: dict[str, int] = {}
        self.logits: list[list[torch.Tensor]] = [[] for _ in tokens]

    def __call__(self, logits: torch.Tensor, seqs) -> torch.Tensor:
        out = []
        for row, seq in zip(logits, seqs):
            i = self.index[seq.request_id]
            step = len(self.logits[i])
            self.logits[i].append(row.detach().cpu().clone())
            out.append(self.tokens[i][min(step, len(self.tokens[i]) - 1)])
        return torch.tensor(out, dtype=torch.int64, device=logits.device)


def _graph_logits(artifact: Path, prompts: list[list[int]], tokens: list[list[int]]
                  ) -> tuple[list[torch.Tensor], dict]:
    """Each prompt's logits (N, V) from the artifact's runtime, teacher-forced on `tokens`, and the
    steps run per graph. The first prompt runs one step alone; the rest join the running batch
    after it, as requests arriving mid-decode do."""
    from .runtime.engine import LLM
    from .runtime.params import SamplingParams

    llm = LLM(artifact)
    teacher = _TeacherSampler(tokens)
    llm.sampler = teacher
    params = SamplingParams(max_tokens=len(tokens[0]), ignore_eos=True)
    arrivals = [[0], list(range(1, len(prompts)))]
    outputs = {}
    while arrivals or llm.has_unfinished_requests():
        for i in arrivals.pop(0) if arrivals else ():
            teacher.index[llm.add_request(prompts[i], params)] = i
        for event in llm.step():
            if event.output is not None:
                outputs[teacher.index[event.request_id]] = event.output
    for i, out in sorted(outputs.items()):
        if out.error or len(teacher.logits[i]) != len(tokens[i]):
            raise VerifyError(f"prompt {i}: the runtime produced {len(teacher.logits[i])} of {len(tokens[i])} steps "
                              f"({out.finish_reason}: {out.error})")
    return [torch.stack(rows) for rows in teacher.logits], dict(llm.stats.steps)


# --- layers ----------------------------------------------------------------------------------
_INDEXED = re.compile(r"\.\d+$")


def decoder_layer_paths(gm: torch.fx.GraphModule) -> dict[int, str]:
    """layer_idx -> module path of the decoder layer holding that layer's canonical attention node:
    the outermost module on the node's stack that is an element of a ModuleList (path ends in .N)."""
    paths = {}
    for node in gm.graph.find_nodes(op="call_function", target=torch.ops.graphgen.attention.default):
        stack = [p for p, _ in (node.meta.get("nn_module_stack") or {}).values() if _INDEXED.search(p)]
        if not stack:
            raise VerifyError(f"{node.name}: no decoder-layer module on its stack; --layers cannot name layers")
        paths[int(node.kwargs["layer_idx"])] = min(stack, key=len)
    return dict(sorted(paths.items()))


def _with_layer_outputs(gm: torch.fx.GraphModule, paths: dict[int, str]) -> None:
    """Make gm return (logits, out_layer0, out_layer1, ...): each layer's output is the last node
    computed inside that layer's module with the residual stream's shape."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    picked = {}
    for node in gm.graph.nodes:
        stack = {p for p, _ in (node.meta.get("nn_module_stack") or {}).values()}
        val = node.meta.get("val")
        for layer, path in paths.items():
            if path in stack and isinstance(val, torch.Tensor) and val.dim() == 3:
                picked[layer] = node
    missing = sorted(set(paths) - set(picked))
    if missing:
        raise VerifyError(f"no output node found for decoder layers {missing}")
    out.args = ((out.args[0], *(picked[layer] for layer in paths)),)
    gm.recompile()


@torch.no_grad()
def _layer_rows(manifest, prompts: list[list[int]], tokens: list[list[int]], device: torch.device,
                ref_model, eager_model) -> list[Row]:
    from .capture.export import capture
    from .capture.interface import register
    from .compiler import WRAPPER_PREFIX, paged_graph_module

    dtype_name = manifest.data["dtype"]
    dtype, spec = DTYPES[dtype_name], manifest.kv
    model = _hf_model(manifest.model_dir, dtype, device, attn=register())
    ep, _ = capture(model, max_batch=2, max_seq_len=manifest.limits["max_model_len"])
    paths = decoder_layer_paths(ep.graph_module)
    hf_paths = {layer: p.removeprefix(WRAPPER_PREFIX) for layer, p in paths.items()}
    graphs = {}
    for phase in ("prefill", "decode"):
        gm, _ = paged_graph_module(ep, phase, spec, sampled_rows_only=False)  # every row of every layer
        _with_layer_outputs(gm, paths)
        graphs[phase] = gm
    bs, m = spec.block_size, spec.max_blocks_per_seq
    t = lambda xs: torch.tensor(xs, dtype=torch.int64, device=device)  # noqa: E731
    table = torch.arange(1, m + 1, dtype=torch.int32, device=device)[None]  # block 0 is scratch
    rows = []
    for i, (ids, toks) in enumerate(zip(prompts, tokens)):
        pools = [torch.zeros(spec.pool_shape(m + 1), dtype=dtype, device=device) for _ in range(2 * spec.num_layers)]
        p = len(ids)
        _, *hid = graphs["prefill"](t(ids)[None], t(range(p))[None], t([p - 1]), t([p]), t(range(bs, bs + p)), *pools)
        per_step = [[h[0] for h in hid]]  # each (p, H)
        for s, tok in enumerate(toks[:-1]):
            pos = p + s
            _, *hid = graphs["decode"](t([[tok]]), t([[pos]]), table, t([pos + 1]), t([bs + pos]), *pools)
            per_step.append([h[0] for h in hid])  # each (1, H)
        full = ids + toks[:-1]
        _, ref = _forward(ref_model, full, device, hf_paths)
        _, eager = _forward(eager_model, full, device, hf_paths)
        for layer in paths:
            graph = torch.cat([step[layer] for step in per_step])
            for phase, sl in (("prefill", slice(0, p)), ("decode", slice(p, len(full)))):
                if sl.start < sl.stop:
                    rows.append(compare(graph[sl], eager[layer][sl], ref[layer][sl], dtype_name,
                                        prompt=i, step=0 if phase == "prefill" else 1, layer=layer, phase=phase))
    return rows


# --- entry point -----------------------------------------------------------------------------
def verify_artifact(artifact_dir: str | Path, *, prompts: list[str] | list[list[int]] | None = None,
                    max_new_tokens: int | None = None, layers: bool = False, top_k: int = 5,
                    write: bool = True) -> VerifyReport:
    """Verify an artifact against HF eager in tiers (module docstring); prompts and max_new_tokens
    default to the recipe's `verify:` section. Writes report/verify.json into the artifact unless
    write=False. `report.passed` is the verdict; nothing raises for a failed comparison."""
    from .runtime.tokenizer import load_tokenizer

    root = Path(artifact_dir)
    manifest = read_manifest(root)
    recipe_verify = manifest.data.get("recipe", {}).get("verify", {})
    prompts = list(prompts if prompts is not None else recipe_verify.get("prompts") or [])
    n = int(max_new_tokens if max_new_tokens is not None else recipe_verify.get("max_new_tokens", 16))
    if not prompts:
        raise VerifyError("no prompts: pass some (--prompts FILE) or give the recipe verify.prompts")
    if n < 1:
        raise VerifyError(f"max_new_tokens {n} must be >= 1")
    if top_k < 1:
        raise VerifyError(f"top_k {top_k} must be >= 1")
    tokenizer = None
    ids = []
    for p in prompts:
        if isinstance(p, str):
            tokenizer = tokenizer or load_tokenizer(manifest.model_dir)
            ids.append(tokenizer.encode(p))
        else:
            ids.append([int(x) for x in p])
    limit = manifest.limits["max_model_len"]
    for i, p in enumerate(ids):
        if not p or len(p) + n > limit:
            raise VerifyError(f"prompt {i}: {len(p)} tokens + {n} new exceed the artifact's max_model_len {limit} "
                              "(or the prompt is empty); shorten it or lower --max-new-tokens")

    dtype_name = manifest.data["dtype"]
    device = torch.device(manifest.data.get("device", "cpu"))
    formats = {g["format"] for g in manifest.graphs.values()}
    backend = "eager" if formats == {"exported"} else "inductor" if formats == {"aoti"} else "+".join(sorted(formats))
    exact = backend == "eager" and dtype_name == "float32"

    ref_model = _hf_model(manifest.model_dir, torch.float64, device)
    eager_model = _hf_model(manifest.model_dir, DTYPES[dtype_name], device)
    eager_tokens, eager_logits, ref_logits = [], [], []
    for p in ids:
        toks, logits = _greedy(eager_model, p, n, device)
        eager_tokens.append(toks)
        eager_logits.append(logits.cpu())
        ref_logits.append(_forward(ref_model, p + toks[:-1], device)[0][len(p) - 1:].cpu())
    graph_logits, graph_steps = _graph_logits(root, ids, eager_tokens)

    report = VerifyReport(
        artifact=str(root), manifest_sha256=sha256_file(root / MANIFEST), backend=backend, dtype=dtype_name,
        prompts=ids, max_new_tokens=n, top_k=top_k, exact_tokens=exact,
        gate={"error": "RMSE vs the float64 eager reference", "multiplier": MULTIPLIER[dtype_name], "floor": FLOOR,
              "rule": "graph_error <= multiplier * eager_error + floor",
              "tokens": "identical" if exact else f"first divergence must be a top-{top_k} near-tie"},
        graph_steps=graph_steps,
    )
    for i in range(len(ids)):
        g, e, r = graph_logits[i], eager_logits[i], ref_logits[i]
        report.prefill.append(compare(g[0], e[0], r[0], dtype_name, prompt=i, step=0))
        if n > 1:
            steps = [compare(g[s], e[s], r[s], dtype_name, prompt=i, step=s) for s in range(1, n)]
            row = compare(g[1:], e[1:], r[1:], dtype_name, prompt=i, step=1)
            # the step to look at: the first over its own limit, else the worst
            worst = max(steps, key=lambda x: x.graph_error / x.limit)
            row.step = next((x.step for x in steps if not x.passed), worst.step)
            report.decode.append(row)
            report.decode_steps += steps
        report.tokens.append(compare_tokens(i, eager_tokens[i], g, e, exact=exact, top_k=top_k))
    if layers:
        report.layers = _layer_rows(manifest, ids, eager_tokens, device, ref_model, eager_model)
    if write:
        path = root / REPORT_FILE
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return report


# --- printing --------------------------------------------------------------------------------
def _worst(rows: list[Row]) -> Row | None:
    return max(rows, key=lambda r: r.graph_error / r.limit) if rows else None


def print_report(report: VerifyReport, console) -> None:
    """A rich summary: one line per tier (worst row), the token comparison, the verdict."""
    from rich.table import Table

    table = Table(title=f"verify {report.artifact} ({report.backend}, {report.dtype})")
    for col in ("tier", "result", "rows", "worst graph err", "limit", "eager err", "max |graph-eager|"):
        table.add_column(col)
    mark = lambda ok: "[green]pass[/]" if ok else "[red]FAIL[/]"  # noqa: E731
    for tier in ("prefill", "decode"):
        rows = getattr(report, tier)
        w = _worst(rows)
        if w is None:
            table.add_row(tier, "-", "0", "", "", "", "")
            continue
        table.add_row(tier, mark(all(r.passed for r in rows)), str(len(rows)), f"{w.graph_error:.3g}",
                      f"{w.limit:.3g}", f"{w.eager_error:.3g}", f"{max(r.max_abs for r in rows):.3g}")
    tok = report.tokens
    same = sum(r.diverged_at is None for r in tok)
    table.add_row("tokens", mark(all(r.passed for r in tok)), str(len(tok)),
                  f"{same}/{len(tok)} identical", report.gate["tokens"], "", "")
    if report.layers is not None:
        layer = report.first_divergent_layer
        w = _worst(report.layers)
        table.add_row("layers", mark(layer is None), str(len(report.layers)),
                      "" if w is None else f"{w.graph_error:.3g}", "" if w is None else f"{w.limit:.3g}",
                      "" if w is None else f"{w.eager_error:.3g}", "")
    console.print(table)
    if report.graph_steps:
        console.print("  runtime steps per graph: " + ", ".join(f"{g} {n}" for g, n in report.graph_steps.items()))
    for r in tok:
        if r.diverged_at is not None:
            console.print(f"  prompt {r.prompt}: {r.detail}")
    layer = report.first_divergent_layer
    if report.layers is not None:
        where = "none" if layer is None else f"{layer.layer} ({layer.phase}, prompt {layer.prompt})"
        console.print(f"  first divergent layer: {where}")
    fail = report.first_failure
    if fail is None:
        console.print("[green]verify passed[/]")
    else:
        where = ", ".join(f"{k} {v}" for k, v in fail.items() if k in ("tier", "prompt", "step", "layer"))
        console.print(f"[red]verify FAILED[/] at {where}")


__all__ = ["VerifyError", "VerifyReport", "Row", "TokenRow", "compare", "compare_tokens", "decoder_layer_paths",
           "print_report", "verify_artifact", "MULTIPLIER", "FLOOR", "REPORT_FILE"]

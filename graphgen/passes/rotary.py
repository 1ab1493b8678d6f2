"""Rotary tables: `cos`/`sin` of the positions -> a lookup in a table computed at compile time.

A rotary embedding computes `cos(emb)` and `sin(emb)` from the positions once per forward, and
every layer multiplies its queries and keys by them. A compiler that fuses pointwise work into its
consumers (Inductor) computes the two functions again inside each layer's kernel, for every head:
in bench-125m's 64-row mixed step, ~0.4 ms of a ~58 ms step went to transcendental functions
where a table lookup needs a few loads (docs/performance.md). The serving stacks keep a cos/sin
cache indexed by position (vLLM's `cos_sin_cache`); this pass does the same to a captured graph,
for any model whose `cos` and `sin` depend on the positions alone:

- A `cos` or `sin` node whose inputs come only from the `position_ids` input and graph constants
  (`inv_freq`) is evaluated at compile time for every position below `num_positions` (the
  recipe's max_model_len: the runtime never feeds a position past it), with the graph's own ATen
  ops, so the table holds exactly what eager HF computes for those positions.
- The node becomes `embedding(table, position_ids)`, the table a buffer of the graph (an extra
  constant of the artifact), and the arithmetic that fed only it is removed.

A node stays as it is where its value at one position depends on the others (a reduction over the
positions, as dynamic rope scaling does: caught by evaluating other sets of positions too, reversed,
the first half, every other one, and comparing their rows) or where its shape is not the positions'
shape plus one trailing dimension. The record says which nodes became tables and why others stayed.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from .subgraph import ancestors, standalone

TRIG = (torch.ops.aten.cos.default, torch.ops.aten.sin.default)
POSITIONS = "position_ids"
TABLE_PREFIX = "graphgen_rotary_table"


@dataclass
class RotaryRecord:
    tabulated: list[str] = field(default_factory=list)  # "cos -> graphgen_rotary_table_0 (2048, 64)"
    skipped: list[str] = field(default_factory=list)  # why a cos/sin node stays


def tabulate_rotary(gm: fx.GraphModule, num_positions: int) -> RotaryRecord:
    """Replace gm's position-only `cos`/`sin` nodes by lookups in tables of `num_positions` rows
    (module docstring); returns what it did. gm is changed in place and recompiled."""
    record = RotaryRecord()
    if num_positions < 1:
        raise ValueError(f"tabulate_rotary: num_positions must be >= 1, got {num_positions}")
    positions = next((n for n in gm.graph.nodes if n.op == "placeholder" and n.name == POSITIONS), None)
    trig = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in TRIG]
    if positions is None:
        record.skipped += [f"{n.name}: the graph has no {POSITIONS} input" for n in trig]
        return record
    for node in trig:
        table, why = _table(gm, node, positions, num_positions)
        if table is None:
            record.skipped.append(f"{node.name}: {why}")
            continue
        name = _free_name(gm)
        gm.register_buffer(name, table)
        with gm.graph.inserting_before(node):
            attr = gm.graph.get_attr(name)
            lookup = gm.graph.call_function(torch.ops.aten.embedding.default, (attr, positions))
        lookup.meta.update(node.meta)
        node.replace_all_uses_with(lookup)
        gm.graph.erase_node(node)
        record.tabulated.append(f"{node.name} -> {name} {tuple(table.shape)}")
    if record.tabulated:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return record


def _table(gm: fx.GraphModule, node: fx.Node, positions: fx.Node,
           num_positions: int) -> tuple[torch.Tensor | None, str]:
    """node's values for positions 0 .. num_positions - 1 as a (num_positions, D) table, or None
    and why not."""
    subgraph = ancestors(node)
    leaves = [n for n in subgraph if n.op != "call_function"]
    if positions not in subgraph:
        return None, f"does not depend on {POSITIONS}"
    if any(n is not positions and n.op != "get_attr" for n in leaves):
        return None, f"depends on inputs other than {POSITIONS}"
    if any(_impure(n) for n in subgraph):
        return None, "its arithmetic mutates a tensor or draws random numbers"
    pos_shape, out_shape = _shape(positions), _shape(node)
    if pos_shape is None or out_shape is None or len(out_shape) != len(pos_shape) + 1 or not pos_shape \
            or [str(s) for s in out_shape[:-1]] != [str(s) for s in pos_shape] or not isinstance(out_shape[-1], int):
        return None, f"shape {out_shape} is not the positions' {pos_shape} plus a fixed last dimension"
    device, dtype = positions.meta["val"].device, positions.meta["val"].dtype
    ids = torch.arange(num_positions, dtype=dtype, device=device)
    module, _ = standalone(gm, node)  # its one input: the positions (checked above)
    dims = list(dict.fromkeys([len(pos_shape) - 1, 0]))  # positions along the last dim, then the first
    tables = [_evaluate(module, _along(ids, len(pos_shape), d)) for d in dims]
    if any(t is None for t in tables):
        return None, "its arithmetic could not run at compile time"
    table = tables[0].reshape(num_positions, out_shape[-1])
    # The same rows from other sets of positions: reversed, the first half, every other one (a
    # reduction over the positions, a cumulative op, an index into them would change them).
    checks = [(t, torch.arange(num_positions)) for t in tables[1:]]
    for subset in (ids.flip(0), ids[: max(1, num_positions // 2)], ids[1::2]):
        if subset.numel():
            checks.append((_evaluate(module, _along(subset, len(pos_shape), dims[0])), subset))
    for value, rows in checks:
        if value is None or value.numel() != rows.numel() * out_shape[-1] \
                or not torch.equal(value.reshape(rows.numel(), -1), table[rows.to(table.device)]):
            return None, "its value at a position depends on the other positions"
    return table.contiguous(), ""


def _along(ids: torch.Tensor, rank: int, dim: int) -> torch.Tensor:
    shape = [1] * rank
    shape[dim] = ids.numel()
    return ids.reshape(shape)


def _impure(node: fx.Node) -> bool:
    """Whether running node at compile time could change state or give another value each time."""
    target = node.target
    if node.op != "call_function":
        return False
    if not isinstance(target, torch._ops.OpOverload):
        return node.is_impure()
    return target._schema.is_mutable or torch.Tag.nondeterministic_seeded in target.tags


def _evaluate(module: fx.GraphModule, ids: torch.Tensor) -> torch.Tensor | None:
    """module (the node's subgraph) on the positions ids, or None where it cannot run here."""
    try:
        with torch.no_grad():
            value = module(ids)
    except Exception:  # noqa: BLE001 - an op that needs the real graph's context: leave the node
        return None
    return value if isinstance(value, torch.Tensor) else None


def _shape(node: fx.Node) -> list | None:
    val = node.meta.get("val")
    return list(val.shape) if isinstance(val, torch.Tensor) else None


def _free_name(gm: fx.GraphModule) -> str:
    i = 0
    while hasattr(gm, f"{TABLE_PREFIX}_{i}"):
        i += 1
    return f"{TABLE_PREFIX}_{i}"

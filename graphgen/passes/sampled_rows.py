"""Sampled rows: the logits' row gather moved up, so the last layer runs only the rows that sample.

A prefill or mixed step packs many tokens, and only a few of them sample: each sequence's last
token (`logits_indices`). Every token needs the last layer's keys and values (later tokens attend
to them), but after the last attention everything is row by row: the output projection, the
residual adds, the norms, the MLP, the LM head. A row that does not sample feeds only the LM head,
and the graph gathers the sampled rows just before it. This pass moves that gather up through the
row-wise nodes before it, to where the rows meet something that mixes them (the attention) or a
value the rest of the graph also reads (the residual stream entering the last layer). In bench-125m's
64-row mixed step, 48 prompt rows then skip the last layer's output projection and MLP, ~5% of the
step's FLOPs (docs/performance.md).

A node is row-wise here when row i of its output depends on row i of its inputs alone, along the
gathered dimension: elementwise ops (the other operands broadcast or are gathered too), `linear`
(x's rows), reductions over later dimensions (a norm's mean), dtype conversions. The gather moves
above a node only when every reader of the node's value is a gather of the same rows (or a
metadata assert, which follows the value); several gathers of one value become one. The gathered
rows hold what the full rows held: every op computes each row on its own (up to rounding: a matmul
may sum a row in another order for another number of rows).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from .subgraph import meta_value

aten = torch.ops.aten
GATHER = aten.index_select.default
ASSERT = aten._assert_tensor_metadata.default
# elementwise ops whose tensor operands broadcast against each other
ELEMENTWISE = {
    aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.pow.Tensor_Scalar,
    aten.pow.Tensor_Tensor, aten.maximum.default, aten.minimum.default, aten.where.self,
    aten.silu.default, aten.gelu.default, aten.tanh.default, aten.sigmoid.default, aten.relu.default,
    aten.neg.default, aten.rsqrt.default, aten.sqrt.default, aten.exp.default, aten.abs.default,
    aten.alias.default, aten.clone.default, aten.to.dtype, aten._to_copy.default, aten.clamp.default,
}
REDUCTIONS = {aten.mean.dim, aten.sum.dim_IntList, aten.amax.default, aten.amin.default}


@dataclass
class SampledRowsRecord:
    moved: list[str] = field(default_factory=list)  # nodes that now compute only the gathered rows
    gathers: list[str] = field(default_factory=list)  # "<value the rows are gathered from>"


def gather_sampled_rows_early(gm: fx.GraphModule, indices: str = "logits_indices") -> SampledRowsRecord:
    """Move every `index_select(x, dim, <indices input>)` of gm up through the row-wise nodes before
    it (module docstring); returns which nodes moved below the gather and where the gathers now
    are. gm is changed in place and recompiled; a graph without the input is left as it is."""
    record = SampledRowsRecord()
    idx = next((n for n in gm.graph.nodes if n.op == "placeholder" and n.name == indices), None)
    if idx is None:
        return record
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    pending: dict[fx.Node, list[fx.Node]] = {}  # value -> gathers of it along one dim
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is GATHER and node.args[2] is idx:
            pending.setdefault(node.args[0], []).append(node)
    while pending:
        value = max(pending, key=order.__getitem__)  # readers before what they read
        gathers = pending.pop(value)
        dim = gathers[0].args[1]
        operands = _row_operands(value, dim) if _only_gathered(value, gathers, dim) else None
        if operands is None:  # the gather stays here: one for all its readers
            for extra in gathers[1:]:
                extra.replace_all_uses_with(gathers[0])
                gm.graph.erase_node(extra)
            record.gathers.append(value.name)
            continue
        args, kwargs = list(value.args), dict(value.kwargs)
        for where, operand, operand_dim in operands:
            with gm.graph.inserting_after(_after(operand)):
                gathered = gm.graph.call_function(GATHER, (operand, operand_dim, idx))
            pending.setdefault(operand, []).append(gathered)
            if isinstance(where, int):
                args[where] = gathered
            else:
                kwargs[where] = gathered
        with gm.graph.inserting_after(value):
            rows = gm.graph.call_function(value.target, tuple(args), kwargs)
        rows.meta = {k: v for k, v in value.meta.items() if k not in ("val", "tensor_meta")}  # its shape changed
        for gather in gathers:
            gather.replace_all_uses_with(rows)
            gm.graph.erase_node(gather)
        for user in list(value.users):  # metadata asserts: the dtype, device and layout are the same
            user.replace_input_with(value, rows)
        gm.graph.erase_node(value)
        record.moved.append(value.name)
    gm.graph.lint()
    gm.recompile()
    return record


def _only_gathered(value: fx.Node, gathers: list[fx.Node], dim) -> bool:
    """Every reader of value is one of `gathers` (all along `dim`) or a metadata assert."""
    return isinstance(dim, int) and all(g.args[1] == dim for g in gathers) and all(
        user in gathers or (user.target is ASSERT and not user.users) for user in value.users)


def _row_operands(node: fx.Node, dim: int) -> list[tuple[int | str, fx.Node, int]] | None:
    """If row i (along dim) of node's value depends on row i of its operands alone: the operands
    to gather, as (argument position or keyword, operand, the operand's own row dimension); None
    where it does not, or where the shapes to decide it are unknown."""
    if node.op != "call_function" or not isinstance(meta_value(node), torch.Tensor):
        return None
    out = meta_value(node)
    dim = dim % out.dim() if out.dim() else None
    if dim is None:
        return None
    if node.target is aten.linear.default:  # (..., T, K) @ (N, K).T: the rows of x
        return [(0, node.args[0], dim)] if dim < out.dim() - 1 else None
    if node.target in REDUCTIONS:
        x = node.args[0]
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if not isinstance(meta_value(x), torch.Tensor) or not dims:
            return None
        rank = meta_value(x).dim()
        return [(0, x, dim)] if all(d % rank > dim for d in dims) else None
    if node.target not in ELEMENTWISE:
        return None
    operands = []
    for where, arg in [*enumerate(node.args), *node.kwargs.items()]:
        if not isinstance(arg, fx.Node):
            continue
        val = meta_value(arg)
        if not isinstance(val, torch.Tensor):
            return None
        own = dim - (out.dim() - val.dim())  # broadcasting aligns the trailing dimensions
        if own < 0 or _is_one(val.shape[own]):
            continue  # broadcast along the rows: the same for every row
        operands.append((where, arg, own))
    return operands


def _is_one(size) -> bool:
    return isinstance(size, int) and size == 1


def _after(node: fx.Node) -> fx.Node:
    """Where a gather of node's value goes: right after it, or after the last input for an input."""
    if node.op != "placeholder":
        return node
    return [n for n in node.graph.nodes if n.op == "placeholder"][-1]

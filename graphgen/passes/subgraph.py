"""The part of a graph one node's value needs, run on its own at compile time (passes that decide
from what a subgraph computes: canonicalize's masks, rotary's cos/sin tables), and the fake value
export recorded for a node (what lint and sampled_rows read shapes from)."""
from __future__ import annotations

from typing import Any

import torch.fx as fx


def meta_value(node: Any):
    """The fake tensor (or other value) export recorded for node; None for a non-node argument or
    a node without one (added by a pass after export)."""
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def ancestors(node: fx.Node) -> list[fx.Node]:
    """node and every node it reads, directly or not, in graph order."""
    seen, stack = {node}, [node]
    while stack:
        for arg in stack.pop().all_input_nodes:
            if arg not in seen:
                seen.add(arg)
                stack.append(arg)
    return [n for n in node.graph.nodes if n in seen]


def standalone(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.GraphModule, list[fx.Node]]:
    """node's value as a GraphModule of its own: the nodes of `ancestors(node)` copied in graph
    order, its constants read from gm. Also returns gm's placeholders among them, in the order the
    new module takes them."""
    needed = ancestors(node)
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in needed:  # graph order keeps producers before consumers
        env[n] = graph.node_copy(n, lambda a: env[a])
    graph.output(env[node])
    return fx.GraphModule(gm, graph), [n for n in needed if n.op == "placeholder"]

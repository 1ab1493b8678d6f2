"""The part of a graph one node's value needs, run on its own at compile time (passes that decide
from what a subgraph computes: canonicalize's masks, rotary's cos/sin tables)."""
from __future__ import annotations

import torch.fx as fx


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

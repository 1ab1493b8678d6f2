"""Cut the LM head off a paged CPU graph: the graph returns the hidden rows the head reads, and the
runtime applies the head (runtime/graphs.py: `HeadedGraph`).

Where the sampling policy is known (the runtime), a greedy step needs only each row's argmax, which
`graphgen::greedy_head` finds without computing every logit exactly: on bench-125m the head is a
32000 x 768 matrix, the largest of a step. Other steps get the logits from the same fp32 linear
kernel the graph would have called (as vLLM computes logits apart from the model's forward).

The head is cut only where that is the plain form the runtime reproduces: the graph's output is
`select(linear(hidden, weight))` with an fp32 or bf16 weight constant and no bias, read by nothing else
(softcaps, scales and biases keep their head in the graph), and only where the head is large enough
that a call from Python costs little beside it (a tiny model's head stays).
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

MIN_HEAD_ELEMENTS = 1 << 20  # smaller heads stay in the graph
HEAD_DTYPES = (torch.float32, torch.bfloat16)  # those graphgen's linear and greedy_head kernels take


def split_lm_head(gm: fx.GraphModule, *, min_elements: int = MIN_HEAD_ELEMENTS) -> str | None:
    """Make `gm` return the LM head's input rows instead of its logits; the head weight's name (a
    constant of gm), or None where the graph is left as it is."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    (value,) = out.args
    if not isinstance(value, fx.Node) or value.target is not torch.ops.aten.select.int:
        return None
    head = value.args[0]
    if head.target is not torch.ops.aten.linear.default or len(head.users) != 1:
        return None
    hidden, weight, *bias = head.args
    if any(b is not None for b in bias) or not isinstance(weight, fx.Node) or weight.op != "get_attr":
        return None
    tensor = _constant(gm, weight.target)
    if tensor is None or tensor.dtype not in HEAD_DTYPES or tensor.dim() != 2 or tensor.numel() < min_elements:
        return None
    with gm.graph.inserting_before(out):
        rows = gm.graph.call_function(torch.ops.aten.select.int, (hidden, *value.args[1:]))
    out.args = (rows,)
    gm.graph.erase_node(value)
    gm.graph.erase_node(head)
    if not weight.users:
        gm.graph.erase_node(weight)
    gm.recompile()
    return weight.target


def _constant(gm: fx.GraphModule, name: str) -> torch.Tensor | None:
    try:
        value = operator.attrgetter(name)(gm)  # a dotted get_attr target
    except AttributeError:
        return None
    return value if isinstance(value, torch.Tensor) else None

"""KV-cache writes: torch_npu's `npu_scatter_nd_update_` and `scatter_update_`, and the graph form
`graphgen::kv_cache_scatter_` that the paged graphs use.

  npu_scatter_nd_update_(self, indices, updates): indices (..., k) int32/int64, k <= self.dim();
      self[tuple(indices[..., j] for j in range(k))] = updates, with updates of shape
      indices.shape[:-1] + self.shape[k:]. For a (num_blocks, block_size, H) cache, indices
      (T, 2) = [block_id, offset] per token and updates (T, H).
  scatter_update_(self, indices, updates, axis): indices (B,) int32/int64 (0-d = (1,)) give, for each
      batch b (dim 0), the start offset along `axis`: self[b, ..., indices[b] + e, ...] =
      updates[b, ..., e, ...] for e < updates.shape[axis] (updates equals self in every other dim).
      2-D indices are undocumented upstream: NotImplementedError.
  kv_cache_scatter_(cache, indices, updates) -> (): exactly npu_scatter_nd_update_'s write.

Why the third op: a custom op whose schema returns an alias of a mutated input (`Tensor(a!) ->
Tensor(a!)`) cannot be functionalized in torch 2.13 ("Found a custom (non-ATen) operator whose
output has alias annotations"), so torch.compile and AOTInductor refuse graphs that contain the two
torch_npu forms (torch.export's training IR still records them). `kv_cache_scatter_` returns
nothing, so export records it, functionalization wraps it in auto_functionalized_v2, Inductor /
AOTInductor write into the caller's cache tensor in place. The NPU lowering swaps it for
`npu_scatter_nd_update_` 1:1.

Out-of-range indices are forbidden on device (unchecked there: they corrupt memory); here every
eager call checks them and raises, so a runtime that pads with -1 learns to reserve a scratch slot.
Duplicate indices leave one of the written rows (unspecified which), as on device.
"""
from __future__ import annotations

import torch

from ._checks import fail, unsupported
from ._registry import define

ND = "npu_scatter_nd_update_"
AXIS = "scatter_update_"
GRAPH = "kv_cache_scatter_"
define(ND, "(Tensor(a!) self, Tensor indices, Tensor updates) -> Tensor(a!)")
define(AXIS, "(Tensor(a!) self, Tensor indices, Tensor updates, int axis) -> Tensor(a!)")
define(GRAPH, "(Tensor(a!) cache, Tensor indices, Tensor updates) -> ()", npu=False)


def _check_nd(op: str, self: torch.Tensor, indices: torch.Tensor, updates: torch.Tensor) -> None:
    if indices.dtype not in (torch.int32, torch.int64):
        fail(op, "indices", f"has dtype {indices.dtype}", "pass int32 or int64 indices")
    if indices.dim() < 2:
        fail(op, "indices", f"has shape {tuple(indices.shape)}",
             "indices must be at least 2-D: (..., k) with k leading dims of self per row, e.g. (T, 2) [block, offset]")
    k = indices.shape[-1]
    if k > self.dim():
        fail(op, "indices", f"last dim is {k} but self has only {self.dim()} dims", "index at most self.dim() dims")
    want = (*indices.shape[:-1], *self.shape[k:])
    if tuple(updates.shape) != tuple(want):
        fail(op, "updates", f"has shape {tuple(updates.shape)}",
             f"pass indices.shape[:-1] + self.shape[{k}:] = {tuple(want)}")
    if updates.dtype != self.dtype:
        fail(op, "updates", f"has dtype {updates.dtype} but self has {self.dtype}", f"pass updates.to({self.dtype})")


def _check_nd_range(op: str, self: torch.Tensor, indices: torch.Tensor) -> None:
    if indices.numel() == 0:
        return
    k = indices.shape[-1]
    flat = indices.reshape(-1, k).to(torch.int64)
    limits = torch.tensor(self.shape[:k], dtype=torch.int64, device=flat.device)
    bad = (flat < 0) | (flat >= limits)
    if bool(bad.any()):
        row = int(bad.any(-1).nonzero()[0, 0])
        fail(op, "indices", f"row {row} = {flat[row].tolist()} is out of range for self's leading dims "
             f"{tuple(self.shape[:k])}", "the device forbids out-of-range indices: point padding tokens at a "
             "reserved scratch slot instead of -1")


def _index_tuple(indices: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(..., k) index rows -> k index tensors for index_put_ (one per leading dim of the target)."""
    return tuple(indices.to(torch.int64).unbind(-1))


@torch.library.impl(f"graphgen::{ND}", "CompositeExplicitAutograd")
def npu_scatter_nd_update_(self, indices, updates):
    _check_nd(ND, self, indices, updates)
    _check_nd_range(ND, self, indices)
    self.index_put_(_index_tuple(indices), updates)
    return self


@torch.library.register_fake(f"graphgen::{ND}")
def _nd_fake(self, indices, updates):
    _check_nd(ND, self, indices, updates)
    return self


@torch.library.impl(f"graphgen::{GRAPH}", "CompositeExplicitAutograd")
def kv_cache_scatter_(cache, indices, updates) -> None:
    """cache (num_blocks, block_size, H) or any rank; indices (T, k) [block_id, offset]; updates
    (T, *cache.shape[k:]). Writes in place; returns nothing (graph-friendly)."""
    _check_nd(GRAPH, cache, indices, updates)
    _check_nd_range(GRAPH, cache, indices)
    cache.index_put_(_index_tuple(indices), updates)


@torch.library.register_fake(f"graphgen::{GRAPH}")
def _graph_fake(cache, indices, updates) -> None:
    _check_nd(GRAPH, cache, indices, updates)


def _check_axis(self: torch.Tensor, indices: torch.Tensor, updates: torch.Tensor, axis: int) -> int:
    op = AXIS
    if not 2 <= self.dim() <= 8:
        fail(op, "self", f"has {self.dim()} dims", "data must have 2 to 8 dims")
    if indices.dtype not in (torch.int32, torch.int64):
        fail(op, "indices", f"has dtype {indices.dtype}", "pass int32 or int64 indices")
    if indices.dim() == 2:
        unsupported(op, "indices", "as a 2-D tensor (upstream does not document its meaning)")
    if indices.dim() > 2:
        fail(op, "indices", f"has {indices.dim()} dims", "indices must be 1-D (one start offset per batch)")
    if updates.dim() != self.dim():
        fail(op, "updates", f"has {updates.dim()} dims but self has {self.dim()}", "data and updates must share rank")
    if not -self.dim() <= axis < self.dim():
        fail(op, "axis", f"is {axis} for a {self.dim()}-D tensor", f"pass an axis in [-{self.dim()}, {self.dim()})")
    ax = axis % self.dim()
    if ax == 0:
        fail(op, "axis", "is the batch dim (0)", "indices give per-batch offsets along another axis, e.g. -2")
    n_idx = indices.numel() if indices.dim() else 1
    if updates.shape[0] != n_idx or self.shape[0] != n_idx:
        fail(op, "indices", f"has {n_idx} entries but self/updates have batch {self.shape[0]}/{updates.shape[0]}",
             "pass one start offset per batch (dim 0)")
    for d in range(1, self.dim()):
        if d != ax and updates.shape[d] != self.shape[d]:
            fail(op, "updates", f"has shape {tuple(updates.shape)} vs self {tuple(self.shape)}",
                 f"updates must equal self in every dim but axis {axis}")
    if updates.shape[ax] > self.shape[ax]:
        fail(op, "updates", f"is {updates.shape[ax]} long along axis {axis} but self only {self.shape[ax]}",
             "write at most self.shape[axis] entries")
    if updates.dtype != self.dtype:
        fail(op, "updates", f"has dtype {updates.dtype} but self has {self.dtype}", f"pass updates.to({self.dtype})")
    return ax


@torch.library.impl(f"graphgen::{AXIS}", "CompositeExplicitAutograd")
def scatter_update_(self, indices, updates, axis):
    ax = _check_axis(self, indices, updates, axis)
    starts = indices.reshape(-1).to(torch.int64)
    e, c = updates.shape[ax], self.shape[ax]
    bad = (starts < 0) | (starts + e > c)
    if bool(bad.any()):
        b = int(bad.nonzero()[0, 0])
        fail(AXIS, "indices", f"[{b}] = {int(starts[b])} with {e} updates runs outside [0, {c}) along axis {axis}",
             "the device forbids out-of-range indices: keep indices[b] + updates.shape[axis] <= self.shape[axis]")
    rows = torch.arange(self.shape[0], device=self.device).view(-1, 1)
    cols = starts.view(-1, 1) + torch.arange(e, device=self.device).view(1, -1)
    self.movedim(ax, 1).index_put_((rows, cols), updates.movedim(ax, 1))
    return self


@torch.library.register_fake(f"graphgen::{AXIS}")
def _axis_fake(self, indices, updates, axis):
    _check_axis(self, indices, updates, axis)
    return self

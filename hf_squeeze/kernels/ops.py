"""The kernels' attention step as one torch custom op, for compiled decode steps.

`torch.compile` traces a model's decode step into one graph; the squeezed attention inside it is a
host-side program (lookup kernels, then attention kernels, sized from the layer's index) that the
compiler need not see into. `attend_op` hands it to the graph as one opaque operator,
`hf_squeeze::attend`: its inputs are the step's tensors (query, dynamic keys and values, the
written slots, the request's pins, the counters it adds to), and the layer's index and selection
rule are found by a handle, an int the graph holds as a constant. A handle belongs to the device
view of an index and a rule's value (`attention.handle_key`), which a cache's forks share, so every
request of a cache at one keep runs the same compiled graph; the index tensors stay where they are
(never graph inputs, never copied into a CUDA graph's buffers).
"""

from __future__ import annotations

import itertools
import weakref

import torch

_handles: "weakref.WeakValueDictionary[int, Handle]" = weakref.WeakValueDictionary()
_next = itertools.count()


class Handle:
    """What an `attend_op` call reads besides its tensors: a layer's kernel view and rule. The view
    holds its handles (`KernelIndex.op_handles`), so a handle lives as long as the view."""

    def __init__(self, view, rule):
        self.view, self.rule = view, rule
        self.id = next(_next)
        _handles[self.id] = self


class _Pins:
    """The pinned rows the attention kernel reads (a `selection.Pinned` without its weights)."""

    def __init__(self, rows, count, mask):
        self.rows, self.count, self.mask = rows, count, mask


@torch.library.custom_op("hf_squeeze::attend", mutates_args=("counts",))
def _attend(handle: int, query: torch.Tensor, dyn_keys: torch.Tensor, dyn_values: torch.Tensor,
            key_valid: torch.Tensor | None, counts: torch.Tensor,
            pin_rows: torch.Tensor | None, pin_count: torch.Tensor | None, pin_mask: torch.Tensor | None,
            scaling: float) -> torch.Tensor:
    from . import attend

    found = _handles.get(handle)
    if found is None:
        raise RuntimeError(f"hf_squeeze::attend: no layer with handle {handle} (its cache was freed)")
    pins = None if pin_rows is None else _Pins(pin_rows, pin_count, pin_mask)
    # counts: the layer's `kernel_counts` (keys read, fine centroids scored, compiled steps), all
    # added to by the kernels (a count added by the graph would cost launches and a copy per layer)
    return attend(query, dyn_keys, dyn_values, found.view, found.rule, scaling, key_valid, None, counts[0:1],
                  scored=counts[1:2], pinned=pins, steps=counts[2:3])


@_attend.register_fake
def _(handle, query, dyn_keys, dyn_values, key_valid, counts, pin_rows, pin_count, pin_mask, scaling):
    batch, heads, tokens, dim = query.shape
    return query.new_empty(batch, tokens, heads, dim)


def attend_op(handle: Handle, query, dyn_keys, dyn_values, key_valid, counts, pinned, scaling: float):
    """`kernels.attend` for one step with no padding among its query tokens, as the custom op."""
    pins = (None, None, None) if pinned is None else (pinned.rows, pinned.count, pinned.mask)
    return torch.ops.hf_squeeze.attend(handle.id, query, dyn_keys, dyn_values, key_valid, counts, *pins,
                                       float(scaling))

"""`SqueezedLayer`: one layer of a squeezed cache, the storage transformers' cache contract asks for.

It stores what a request adds (the user input and generated tokens, the "dynamic" part) like
transformers' `DynamicLayer`, in buffers written in place, and hands attention to its
`SparseAttention`, which reads the layer's shared `LayerIndex` of the fixed context: the keys it
returns carry that object to the registered attention function.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import CacheLayerMixin

from .attention import SparseAttention, key_validity, tagged
from .index import LayerIndex
from .selection import SelectionRule


class SqueezedLayer(CacheLayerMixin):
    """One layer: the dynamic keys/values of a request, beside a shared `LayerIndex` of the fixed
    context that its `SparseAttention` reads."""

    is_sliding = False
    is_croppable = True

    def __init__(self, attention: SparseAttention, fixed_tokens: int):
        super().__init__()
        self.attention = attention
        self.fixed_tokens = fixed_tokens
        self.length, self.device_length = 0, None  # dynamic tokens; see `reserve`
        self.planned = None  # see `plan`
        self.compileable = False
        self._pad_valid = None
        # (the cache's `recycle.Spares`, this layer's number): where `reserve` finds the memory of a
        # finished request's step tensors, so that a compiled step's CUDA graph is not recorded again
        self.spares = None

    @property
    def is_compileable(self) -> bool:
        """Whether transformers' `generate` may compile this request's decode steps (and replay them
        as CUDA graphs): a planned capacity gives them fixed shapes; `plan` says if it is asked for."""
        return self.compileable and (self.planned is not None or self.device_length is not None)

    def plan(self, capacity: int | None, input_tokens: int = 1, compileable: bool = False) -> None:
        """Fix the dynamic capacity at `capacity` tokens (`reserve`) once the request's input (its
        first `input_tokens` dynamic tokens, in one step or in chunks) was read, so that every
        later step has fixed shapes; None: no plan (ordinary updates). `compileable`: report the
        layer as compileable meanwhile (`is_compileable`)."""
        self.planned = None if capacity is None else (capacity, input_tokens)
        self.compileable = compileable and capacity is not None
        self.attention.after_read = None if capacity is None else self._reserve_planned

    def _reserve_planned(self, attention_mask) -> None:
        capacity, input_tokens = self.planned
        if self.device_length is None and self.length >= input_tokens:
            self.reserve(max(capacity, self.length), None if attention_mask is None else key_validity(attention_mask))

    @property
    def index(self) -> LayerIndex:
        return self.attention.index

    @property
    def rule(self) -> SelectionRule:
        return self.attention.rule

    # ---- the CacheLayerMixin contract -------------------------------------------------------
    def lazy_initialization(self, key_states, value_states):
        fixed = self.index.keys
        if key_states.dtype != fixed.dtype:
            raise TypeError(
                f"the SqueezedCache holds {fixed.dtype} keys but the model computes {key_states.dtype}: "
                "build or load the cache with the model in the dtype it will generate in"
            )
        if key_states.device != fixed.device:
            raise RuntimeError(
                f"this layer of the SqueezedCache is on {fixed.device} but the model runs it on {key_states.device}: "
                "call cache.to(device), or cache.to(hf_squeeze.layer_devices(model)) for a model spread over "
                "several devices (or build/load the cache after moving the model)"
            )
        if key_states.shape[1] != fixed.shape[0] or key_states.shape[3] != fixed.shape[2]:
            raise ValueError(
                f"the SqueezedCache has {fixed.shape[0]} KV heads of dim {fixed.shape[2]}, the model produced "
                f"{key_states.shape[1]} of dim {key_states.shape[3]}: this cache was built for another model"
            )
        self.dtype, self.device = key_states.dtype, key_states.device
        old = getattr(self, "_key_buffer", None)
        if old is not None and old.shape[:2] == key_states.shape[:2] and old.dtype == key_states.dtype \
                and old.device == key_states.device and self._value_buffer.shape[-1] == value_states.shape[-1]:
            self._set_length(0)  # a reset layer keeps its buffers for the next request of the same shape
        else:
            self._store(key_states[:, :, :0], value_states[:, :, :0], self._room(key_states.shape[-2]))
        self.is_initialized = True

    # The dynamic part lives in buffers with room to grow (doubling), so a decode step writes one
    # token in place instead of copying the whole dynamic part (torch.cat) and allocating anew.
    # `reserve` fixes the capacity and keeps the length on the device: the step then has fixed
    # shapes and no host work that depends on the length, which is what a CUDA graph needs.
    _MIN_CAPACITY = 256

    def _room(self, tokens: int) -> int:
        """The capacity for `tokens` dynamic tokens: at least _MIN_CAPACITY, and a planned request's
        whole capacity at once (so that neither its input nor `reserve` grows and copies the buffers)."""
        return max(tokens, self._MIN_CAPACITY, self.planned[0] if self.planned else 0)

    def _store(self, keys: torch.Tensor, values: torch.Tensor, capacity: int | None = None):
        """Replace the dynamic part by `keys`/`values` [B, H, L, D], with room for `capacity` tokens."""
        batch, heads, length, _ = keys.shape
        capacity = max(capacity or 0, length)
        self._key_buffer = keys.new_empty(batch, heads, capacity, keys.shape[-1])
        self._value_buffer = values.new_empty(batch, heads, capacity, values.shape[-1])
        self._key_buffer[:, :, :length] = keys
        self._value_buffer[:, :, :length] = values
        self._set_length(length)

    def _set_length(self, length: int):
        self.length = length
        self.keys = self._key_buffer[:, :, :length]
        self.values = self._value_buffer[:, :, :length]

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        elif key_states.shape[0] != (held := self._key_buffer.shape[0]):
            raise ValueError(
                f"this SqueezedCache holds {held} sequences but got a batch of {key_states.shape[0]}: "
                "use cache.fork() to start a new request"
            )
        self.attention.pending = True
        new = key_states.shape[-2]
        if self.device_length is not None:
            return self._update_reserved(key_states, value_states)
        start, stop = self.length, self.length + new
        if stop > self._key_buffer.shape[2]:
            self._store(self.keys, self.values, capacity=self._room(max(stop, 2 * self._key_buffer.shape[2])))
        self._key_buffer[:, :, start:stop] = key_states
        self._value_buffer[:, :, start:stop] = value_states
        self._set_length(stop)
        self.attention.key_valid = None
        return tagged(self.keys, self.attention), self.values

    def reserve(self, capacity: int, valid: torch.Tensor | None = None):
        """Fix the dynamic part's capacity at `capacity` tokens and count its length on the device.

        Afterwards `update` takes one token at a time, writes it in place and returns the whole
        buffers; attention masks the unwritten slots from the device length, and the padding
        among the tokens already cached (`valid` [B, length]: False where padding, as the last
        step's attention mask said). Every step then has the same shapes and launches, so it can
        be captured in a CUDA graph and replayed (its tensors are marked as fixed addresses for
        torch.compile). Call `release()` to read the length back and return to ordinary updates.
        """
        if not self.is_initialized:
            raise RuntimeError("reserve() needs a started request: run the prompt through the model first")
        if capacity < self.length:
            raise ValueError(f"capacity {capacity} is below the {self.length} dynamic tokens already cached")
        if capacity > self._key_buffer.shape[2]:
            self._store(self.keys, self.values, capacity=capacity)
        self.capacity = capacity
        self.device_length = torch.full((1,), self.length, dtype=torch.int64, device=self.device)
        self._slots = torch.arange(capacity, device=self.device)
        self._pad_valid = None
        if valid is not None:  # kept even where nothing is padding: checking would wait for the device
            self._pad_valid = torch.ones(self.keys.shape[0], capacity, dtype=torch.bool, device=self.device)
            self._pad_valid[:, : self.length] = valid[:, -self.length :]
        if not torch.compiler.is_compiling():
            self._recycle()
            held = [self._key_buffer, self._value_buffer, self.device_length, self._slots, self._pad_valid]
            for tensor in held + self.attention.step_tensors():
                if tensor is not None:
                    torch._dynamo.mark_static_address(tensor)

    def _recycle(self):
        """Move the tensors a reserved step reads into the memory a finished request of the cache used
        for them (`recycle.Spares`), where there is such memory: the same addresses as that request's."""
        if self.spares is None:
            return
        spares, number = self.spares
        mine = {"keys": self._key_buffer, "values": self._value_buffer, "length": self.device_length,
                "slots": self._slots, "valid": self._pad_valid}
        named = {(number, name): t for name, t in {**mine, **self.attention.request_tensors()}.items()}
        adopted = {name: t for (_, name), t in spares.adopt(self, named, constant={(number, "slots")}).items()}
        self._key_buffer, self._value_buffer = adopted.pop("keys"), adopted.pop("values")
        self._set_length(self.length)
        self.device_length, self._slots, self._pad_valid = adopted.pop("length"), adopted.pop("slots"), adopted.pop("valid")
        self.attention.set_request_tensors(adopted)

    def release(self, length: int | None = None):
        """Leave reserved mode; the tokens written meanwhile become the dynamic part (one host sync,
        unless the caller read the device length already: `length`)."""
        if self.device_length is not None:
            length = int(self.device_length) if length is None else length
            self.device_length, self._pad_valid = None, None
            self._set_length(length)

    def _update_reserved(self, key_states, value_states):
        if key_states.shape[-2] != 1:
            raise ValueError(
                f"a reserved SqueezedCache layer takes one token per step, got {key_states.shape[-2]}: "
                "run the prompt before cache.reserve(), or cache.release() first"
            )
        # The write position comes from the device; a step past the capacity would be silently lost,
        # so index_copy_ (which raises on out-of-range indices) is used rather than clamping.
        self._key_buffer.index_copy_(2, self.device_length, key_states)
        self._value_buffer.index_copy_(2, self.device_length, value_states)
        self.device_length.add_(1)
        self.attention.key_valid = self.reserved_valid()
        buffers = self._key_buffer[:, :, : self.capacity], self._value_buffer[:, :, : self.capacity]
        return tagged(buffers[0], self.attention), buffers[1]

    def reserved_valid(self) -> torch.Tensor | None:
        """In reserved mode, the written slots of the dynamic buffers that are not padding [1 or B,
        capacity] (else None)."""
        if self.device_length is None:
            return None
        # (a compiled step makes the slot numbers in its graph: one tensor fewer for its guards to check)
        slots = torch.arange(self.capacity, device=self.device) if torch.compiler.is_compiling() else self._slots
        written = (slots < self.device_length)[None]
        return written if self._pad_valid is None else written & self._pad_valid

    def dynamic_length(self) -> int:
        return self.length if self.is_initialized else 0

    def get_seq_length(self) -> int:
        return self.fixed_tokens + self.dynamic_length()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if self.device_length is not None:
            return self.capacity, self.fixed_tokens
        return self.dynamic_length() + query_length, self.fixed_tokens

    def get_max_length(self) -> int:
        return -1

    def reset(self):
        self.keys = self.values = None
        self.length, self.device_length = 0, None
        self.is_initialized = False
        self.attention.pending, self.attention.key_valid = False, None
        self.attention.pinned = None
        self.attention.reset_stats()

    def crop(self, tokens_to_remove: int):
        """Remove tokens from the end of the dynamic part: `-n` removes n tokens, 0 removes nothing (assisted
        generation calls it when every candidate was accepted); a positive value is an absolute length to
        keep, as transformers < 5.18 passed it (a length at or above the current one removes nothing)."""
        if tokens_to_remove <= 0:
            remove = -tokens_to_remove
        else:
            remove = max(self.get_seq_length() - tokens_to_remove, 0)
        if remove == 0:
            return
        if remove > self.dynamic_length():
            raise ValueError(
                f"cannot crop {remove} tokens: only {self.dynamic_length()} were added after the "
                f"{self.fixed_tokens}-token fixed context, which cannot be cropped"
            )
        self._set_length(self.length - remove)

    def batch_repeat_interleave(self, repeats: int):
        if self.is_initialized:
            self._store(self.keys.repeat_interleave(repeats, dim=0), self.values.repeat_interleave(repeats, dim=0))
        self._select_pins(torch.arange(self._pinned_rows()).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor):
        if self.is_initialized:
            self._store(self.keys[indices], self.values[indices])
        self._select_pins(indices)

    def reorder_cache(self, beam_idx: torch.LongTensor):
        if self.is_initialized:
            beam_idx = beam_idx.to(self.keys.device)
            self._store(self.keys.index_select(0, beam_idx), self.values.index_select(0, beam_idx))
        self._select_pins(beam_idx)

    def _pinned_rows(self) -> int:
        pinned = self.attention.pinned
        return 0 if pinned is None else pinned.rows.shape[0]

    def _select_pins(self, rows: torch.Tensor):
        """Batch rows moved, repeated or dropped: their pinned keys follow them."""
        pinned = self.attention.pinned
        if pinned is not None:
            self.attention.pinned = pinned.index_rows(torch.as_tensor(rows, device=pinned.rows.device))

    def offload(self):
        raise NotImplementedError("SqueezedCache does not support offloading")

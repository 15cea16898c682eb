"""Attention: the reference math, the squeezed attention of one layer, and the function registered
as `attn_implementation="squeezed"`.

transformers calls the registered function with a layer's query and exactly what the cache's
`update` returned. A squeezed cache tags the key tensor it returns with the layer's attention
object (`LAYER_ATTR`): the link travels with the data of the forward pass, so two caches used in
turn, or in two threads, never see each other's state, and nothing global is kept. Untagged keys
(no cache, a `DynamicCache`, training) get ordinary exact attention with causal and padding masks,
so the implementation is safe to leave on.

`SparseAttention` is the method's online step for one layer: the centroid lookup selects key
ranges of the cluster-sorted fixed context (`selection.lookup`), and exact attention runs over them
plus the sinks, the observation window and every dynamic token. On CUDA the Triton kernels do both
(`kernels.attend`); `attend_reference` is the torch reference they are tested against and the CPU
path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from . import kernels
from .counts import ReadCounts
from .devices import on_device
from .kernels import graphs
from .kernels.ops import Handle, attend_op
from .selection import Pinned, SelectionRule, expand_ranges, key_weights, lookup, pin_keys, rest_parts

_READ_ALL = SelectionRule(exact=True)

LAYER_ATTR = "_hf_squeeze_layer"
GUARD_ATTR = "_hf_squeeze_guard"  # set on the attention modules of a model whose generate() is guarded


def handle_key(rule):
    """What a layer's compiled-step handle (`kernels.ops.Handle`) is found by in its kernel view: the
    rule's value, so that every fork of a keep shares one handle and its requests run one compiled
    graph (a handle is an int constant of the graph: a new one per fork recompiled the second
    request's steps); a rule that holds tensors (per-row budgets) by its identity (the handle holds
    the rule, so its id is not reused meanwhile)."""
    if any(isinstance(value, torch.Tensor) for value in vars(rule).values()):
        return id(rule)
    return rule


def squeezed_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """query [B, Hq, T, D], key/value [B, Hkv, L, D] -> ([B, T, Hq, D], None)."""
    for name in ("sliding_window", "softcap", "s_aux"):
        if kwargs.get(name) is not None:
            raise NotImplementedError(
                f"attn_implementation='squeezed' does not support `{name}` (layer {getattr(module, 'layer_idx', '?')}); "
                "load this model with attn_implementation='sdpa' instead."
            )
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    attention = getattr(key, LAYER_ATTR, None)
    if attention is not None:
        return attention.forward(module, query, key, value, attention_mask, scaling), None
    return exact_attention(query, key, value, attention_mask, scaling, dropout if module.training else 0.0), None


def check_guarded(module) -> None:
    """Refuse attention over a squeezed cache in a model whose generate() was never guarded
    (`integrations.generate.install_guard`), so that no request reaches it unchecked."""
    if not getattr(module, GUARD_ATTR, False):
        raise RuntimeError(
            "this SqueezedCache is used by a model it was not built or loaded for, whose generate() does not "
            "check prompts against the cached context: call cache.bind(model) (checks the model and returns a "
            "cache for it), or build/load the cache with this model"
        )


# ---- the reference math ----------------------------------------------------------------------
def exact_attention(query, key, value, attention_mask, scaling, dropout=0.0) -> torch.Tensor:
    """Plain causal attention with GQA; `attention_mask` is None, boolean or additive [B, 1, T, L]."""
    q_len, kv_len = query.shape[-2], key.shape[-2]
    is_causal = False
    if attention_mask is None and q_len > 1:
        if q_len == kv_len:
            is_causal = True
        else:  # causal, aligned to the end of the keys (the queries are the last tokens)
            attention_mask = causal_mask(q_len, kv_len, query.device)
    out = F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attention_mask,
        dropout_p=dropout,
        is_causal=is_causal,
        scale=scaling,
        enable_gqa=key.shape[1] != query.shape[1],
    )
    return out.transpose(1, 2).contiguous()


def causal_mask(q_len: int, kv_len: int, device) -> torch.Tensor:
    """Boolean [T, L]: query t (the (L - T + t)-th token) sees keys up to itself."""
    return torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(kv_len - q_len)


def partial_attention(q, k, v, mask, scaling, bias=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention over one part of the keys, returning (out, lse) for a later merge.

    q [B, H, G, T, D]; k, v [B, H, L, D] (or broadcastable); mask broadcastable to
    [B, H, G, T, L] (True = attend) or None; bias [B, H, L] added to the scores (a key that stands
    for N equal keys has bias log N). Rows with no key get lse = -inf and out = 0.
    """
    s = torch.einsum("bhgtd,bhld->bhgtl", q, k) * scaling
    if s.shape[-1] == 0:  # nothing selected in this part
        return torch.zeros_like(q), torch.full(s.shape[:-1], float("-inf"), device=q.device)
    if bias is not None:
        s = s + bias[:, :, None, None, :]
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    denom = p.sum(-1, keepdim=True)
    out = torch.einsum("bhgtl,bhld->bhgtd", p, v) / denom.clamp_min(torch.finfo(p.dtype).tiny)
    return out, (m + denom.log()).squeeze(-1)


def merge_partials(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Combine partial attentions over disjoint key sets with a stable log-sum-exp."""
    lse = torch.stack([lse for _, lse in parts])
    total = torch.logsumexp(lse, dim=0)
    safe_total = torch.where(torch.isfinite(total), total, torch.zeros_like(total))
    weights = torch.exp(lse - safe_total)  # exp(-inf) = 0 for empty parts
    return sum(w.unsqueeze(-1) * out for w, (out, _) in zip(weights, parts))


def padding(attention_mask, tokens: int, dyn_len: int):
    """The boolean mask [B, 1, T, Ld] (True = attend) and the real query tokens [B, T]."""
    if attention_mask.dtype != torch.bool:  # additive float mask: 0 where attended
        attention_mask = attention_mask == 0
    # A query token is real (not padding) iff it may attend to itself.
    t = torch.arange(tokens, device=attention_mask.device)
    return attention_mask, attention_mask[:, 0, t, dyn_len - tokens + t]


def key_validity(attention_mask) -> torch.Tensor:
    """The dynamic keys a step's last query token may read [B, Ld] (the real ones: padding excluded)."""
    if attention_mask.dtype != torch.bool:
        attention_mask = attention_mask == 0
    return attention_mask[:, 0, -1, :]


def dynamic_mask(attention_mask, tokens: int, dyn_len: int, device):
    """Mask over the dynamic keys, broadcastable to [B, H, G, T, Ld], and the valid query tokens [B, T]."""
    if attention_mask is None:
        if tokens == 1:
            return None, None
        return causal_mask(tokens, dyn_len, device), None
    mask, q_valid = padding(attention_mask, tokens, dyn_len)
    return mask[:, :, None], q_valid  # [B, 1, 1, T, Ld]


# ---- one layer's squeezed attention ------------------------------------------------------------
class SparseAttention(ReadCounts):
    """The online step of one layer: lookup over the layer's index, then exact attention over the
    selected keys, the sinks and window, and every dynamic token.

    The cache layer that owns it sets `pending` and `key_valid` at each update (see `SqueezedLayer`);
    statistics accumulate in tensors, so a step needs no host synchronisation.
    """

    def __init__(self, index, rule: SelectionRule, kernel_views: dict | None = None,
                 graph_pools: graphs.GraphPools | None = None):
        self.index, self.rule = index, rule
        # Device views of the index for the Triton kernels, built on first use; a cache shares one
        # dict per layer among its forks, so a request does not rebuild them.
        self.kernel_views = {} if kernel_views is None else kernel_views
        self.pending = False  # set by the layer's update, cleared here: see SqueezedCache.update
        self.key_valid = None  # in fixed-capacity mode: the written dynamic slots [1, capacity]
        self.pinned: Pinned | None = None  # the keys this request's input pinned (SqueezeConfig.pin)
        self._op_handle = None  # the decode step's handle for compiled steps (`kernels.ops`)
        # Called with the step's attention mask after each step, by a layer whose capacity is planned
        # (SqueezedLayer.plan): it fixes the capacity once the request's input was read.
        self.after_read = None
        self._bound = (None, None)  # (rule, read_bound under it)
        # Fixed-capacity decode steps are replayed as CUDA graphs (`kernels.graphs`); the layers of
        # one cache share their memory pools.
        self.graph_pools = graph_pools or graphs.GraphPools()
        self._graph = None
        # What a step needs to know of the index's shape, read once: a compiled step that read it from
        # the index's tensors would check them (dynamo's guards) at every step.
        self.heads, self.hierarchical = index.keys.shape[0], index.coarse_counts is not None
        self._index_unsupported = kernels.index_unsupported(index)
        self.reset_stats()

    def forward(self, module, query, key, value, attention_mask, scaling) -> torch.Tensor:
        """What the registered attention function calls: the checks every request passes, then `attend`."""
        check_guarded(module)
        self.pending = False
        out = self.attend(query, key, value, attention_mask, scaling)
        if self.after_read is not None:
            self.after_read(attention_mask)
        return out

    def step_tensors(self) -> list[torch.Tensor]:
        """Every tensor a decode step reads or writes in place: the index and its kernel views, the
        request's pins, the statistics' counters. A compiled step replayed as a CUDA graph needs
        them at fixed addresses (`SqueezedLayer.reserve` marks them)."""
        tensors = list(self.index.tensors().values())
        for view in self.kernel_views.values():
            tensors += [t for t in vars(view).values() if isinstance(t, torch.Tensor)]
        if self.pinned is not None:
            tensors += [self.pinned.rows, self.pinned.count, self.pinned.mask, self.pinned.weights]
        counters = (self.read_fraction_sum, self.scored_sum, self.kernel_counts)
        return tensors + [t for t in counters if isinstance(t, torch.Tensor)]

    def request_tensors(self) -> dict[str, torch.Tensor | None]:
        """The request's own step tensors by name: its pins and counters (`SqueezedLayer._recycle`)."""
        pinned = self.pinned
        pins = {} if pinned is None else {"pin rows": pinned.rows, "pin count": pinned.count, "pin mask": pinned.mask}
        return {**pins, "kernel counts": self.kernel_counts, "read": self.read_fraction_sum, "scored": self.scored_sum}

    def set_request_tensors(self, tensors: dict[str, torch.Tensor | None]) -> None:
        """Replace the request's pins and counters by `tensors` (their values, maybe in other memory)."""
        if self.pinned is not None:
            self.pinned = Pinned(tensors["pin rows"], tensors["pin count"], tensors["pin mask"], self.pinned.weights)
        self.kernel_counts, self.read_fraction_sum, self.scored_sum = (
            tensors["kernel counts"], tensors["read"], tensors["scored"])

    def select_ranges(self, q, scaling, q_weight):
        """The key ranges of the clustered context that queries `q` [B, H, G, T, D] read (a `Selection`).

        The centroid lookup of the method; evaluation baselines (hf_squeeze.eval) override it to
        select the same ranges by other rules over the same machinery.
        """
        return lookup(q, self.index, scaling, self.rule, q_weight)

    def read_bound(self) -> int | None:
        """The most clustered keys one selection under this layer's rule reads per (batch row, KV
        head): its budget plus the largest cluster but one (the cluster that crosses the budget is
        read whole), every key under an exact rule; None where no budget bounds it (thresholds). Found
        once per rule (a host sync) by the torch path, so that its later steps wait for nothing and a
        CUDA graph can capture them; the kernels need no bound."""
        if self._bound[0] is not self.rule:
            bound = None
            if self.rule.exact:
                bound = self.index.clustered_tokens
            elif self.rule.budget is not None:
                budget = int(torch.as_tensor(self.rule.budget).max())
                bound = min(budget + int(self.index.counts.max()) - 1, self.index.clustered_tokens)
            self._bound = (self.rule, bound)
        return self._bound[1]

    def reads_all(self, tokens: int) -> bool:
        """Whether this step reads every key: a step of several query tokens (a user input's
        prefill) under `exact_prefill`."""
        return tokens > 1 and self.rule.exact_prefill and not self.rule.exact

    def step_rule(self, tokens: int) -> SelectionRule:
        """The rule a step of `tokens` query tokens runs under: an exact one when it reads every key."""
        return _READ_ALL if self.reads_all(tokens) else self.rule

    def pins_now(self, tokens: int) -> bool:
        """Whether this step (re)pins keys: a step of input read exactly (a prefill, every chunk of a
        chunked one, a step of assisted generation)."""
        return self.reads_all(tokens) and self.rule.pin_budget is not None

    def input_weights(self, q, scaling, q_valid, dyn_key, dyn_mask) -> torch.Tensor:
        """The torch path's `selection.key_weights` of queries q [B, H, G, T, D] (real tokens `q_valid`
        [B, T] or all); `dyn_mask`: the dynamic keys' mask, as for `partial_attention`."""
        index = self.index
        lse_dense = torch.einsum("bhgtd,hnd->bhgtn", q, index.dense_keys.float()).mul(scaling).logsumexp(-1)
        s = torch.einsum("bhgtd,bhnd->bhgtn", q, dyn_key.float()) * scaling
        if dyn_mask is not None:
            s = s.masked_fill(~dyn_mask, float("-inf"))
        lse_rest = torch.logaddexp(lse_dense, s.logsumexp(-1))
        return key_weights(q, index, scaling, q_valid, lse_rest)

    def pin(self, weights: torch.Tensor) -> None:
        """Pin the keys around those of most exact attention of the request's input so far, adding
        this input step's `weights` [B, H, G, Nc] (`selection.key_weights`) to its earlier steps'
        (`selection.pin_keys`)."""
        if self.pinned is not None:
            weights = weights + self.pinned.weights
        self.pinned = pin_keys(weights, self.index, self.rule.pin_budget)

    def attend(self, query, key, value, attention_mask, scaling) -> torch.Tensor:
        """Exact attention over the selected fixed keys + sinks + window + all dynamic tokens.

        query [B, Hq, T, D]; key/value: the dynamic part [B, H, Ld, D] (what `update` returned);
        attention_mask: boolean [B, 1, T, Ld] over the dynamic part, or None (causal, no padding).
        Returns [B, T, Hq, D]. Triton kernels on CUDA, the torch reference elsewhere.
        """
        if kernels.query_unsupported(query) is None and self._index_unsupported is None:
            with on_device(query.device):  # a layer of a model spread over GPUs may not be on the current one
                return self.attend_kernels(query, key, value, attention_mask, scaling)
        return self.attend_reference(query, key, value, attention_mask, scaling)

    def attend_kernels(self, query, key, value, attention_mask, scaling) -> torch.Tensor:
        tokens = query.shape[2]
        read_all = self.reads_all(tokens)
        rule = self.step_rule(tokens)
        # A two-level view sizes its fine-level room for one coarse budget (forks may read another).
        coarse_budget = None if rule.exact or not self.hierarchical else rule.coarse_budget
        view = self.kernel_views.get((query.device, coarse_budget))
        if view is None:
            view = kernels.kernel_index(self.index, coarse_budget=coarse_budget)
            self.kernel_views[query.device, coarse_budget] = view
        key_valid = q_valid = None
        if self.key_valid is not None:  # one query token: it sees every written slot
            key_valid = self.key_valid.expand(query.shape[0], -1)
        elif attention_mask is not None:
            # The masks registered for "squeezed" are causal AND key padding: the last query row
            # sees every valid key.
            mask, q_valid = padding(attention_mask, query.shape[2], key.shape[2])
            key_valid = mask[:, 0, -1, :]
        self.kernel_counts = self.kernel_counts.to(query.device)
        self.count_selections(query.shape[0] * self.heads, exact=rule.exact)
        pinned = None if read_all else self.pinned
        if torch.compiler.is_compiling():  # a compiled decode step: the kernels as one opaque operator
            if read_all or q_valid is not None or self._op_handle is None:
                raise RuntimeError(
                    "torch.compile takes a squeezed model's decode steps (one token, after an eager prefill), not "
                    "its input's prefill: run the prompt eagerly (generate does), then compile the steps after it"
                )
            return attend_op(self._op_handle, query, key, value, key_valid, self.kernel_counts, pinned, scaling)
        # the handle of this layer's decode step, should a later step be compiled
        found_by = handle_key(self.rule)
        if found_by not in view.op_handles:
            view.op_handles[found_by] = Handle(view, self.rule)
        self._op_handle = view.op_handles[found_by]
        # pinning needs each input row's log-sum-exp over every key, which the prefill finds
        lse = None
        if self.pins_now(tokens):
            lse = torch.empty(query.shape[0], view.heads, query.shape[1] // view.heads * tokens,
                              device=query.device, dtype=torch.float32)

        def launch(query, key_valid):  # the step's device work (the pinned keys read are counted by the
            # kernel besides the lookup's keys: an overlap is counted twice)
            return kernels.attend(query, key, value, view, rule, scaling, key_valid, q_valid, self.kernel_keys,
                                  scored=self.kernel_fine_scored, pinned=pinned, lse=lse)

        if self.key_valid is not None and graphs.available(query.device):  # a fixed-capacity decode step
            return self._replayed(launch, query, key, value, key_valid, view, rule, scaling, pinned)
        out = launch(query, key_valid)
        if lse is not None:
            self.pin(kernels.key_weights(query, view, lse, scaling, q_valid))
        return out

    def _replayed(self, launch, query, key, value, key_valid, view, rule, scaling, pinned) -> torch.Tensor:
        """`launch(query, key_valid)` replayed as this layer's CUDA graph (kernels/graphs.py). The
        signature names what the captured kernels read or write in place besides the query and the
        written slots, which the graph copies in: a step whose signature differs is captured again."""
        pins = (None,) * 3 if pinned is None else (pinned.rows, pinned.count, pinned.mask)
        signature = (id(view), id(rule), scaling, query.device, tuple(query.shape), query.stride(), query.dtype,
                     tuple(key_valid.shape), *map(graphs.describe, (key, value, self.kernel_counts, *pins)))
        if self._graph is None:
            self._graph = graphs.DecodeGraph(self.graph_pools)
        return self._graph.run(signature, (view, rule), launch, query, key_valid)

    def attend_reference(self, query, key, value, attention_mask, scaling) -> torch.Tensor:
        index = self.index
        batch, q_heads, tokens, dim = query.shape
        heads = index.keys.shape[0]
        q = query.view(batch, heads, q_heads // heads, tokens, dim).float()
        if self.key_valid is not None:
            dyn_mask, q_weight = self.key_valid[:, None, None, None, :], None
            value = value.masked_fill(~self.key_valid[:, None, :, None], 0)  # unwritten slots hold garbage
        else:
            dyn_mask, q_weight = dynamic_mask(attention_mask, tokens, key.shape[-2], query.device)

        bound = self.read_bound()  # found by a request's first (eager) step, read by the later ones
        read_all = self.reads_all(tokens)
        if read_all:
            selection = lookup(q, index, scaling, _READ_ALL, q_weight)
        else:
            selection = self.select_ranges(q, scaling, q_weight)
        rows, valid = expand_ranges(selection.starts, selection.lengths, None if read_all else bound)
        head_ids = torch.arange(heads, device=query.device)[None, :, None]
        pinned = None if read_all else self.pinned
        if pinned is not None:  # pinned keys are read once, as their own part
            valid = valid & (pinned.mask.gather(-1, rows) == 0)
            rows, valid = torch.cat([rows, pinned.rows.long()], -1), torch.cat([valid, pinned.valid], -1)
        parts = [
            partial_attention(
                q,
                index.keys[head_ids, rows].float(),
                index.values[head_ids, rows].float(),
                valid[:, :, None, None, :],
                scaling,
            ),
            partial_attention(q, index.dense_keys[None].float(), index.dense_values[None].float(), None, scaling),
            partial_attention(q, key.float(), value.float(), dyn_mask, scaling),
        ]
        if self.rule.estimate_rest and not read_all:
            centroids, means, bias = rest_parts(q, index, scaling, selection)
            parts.append(partial_attention(q, centroids, means, None, scaling, bias))
        out = merge_partials(parts)
        if self.pins_now(tokens):
            self.pin(self.input_weights(q, scaling, q_weight, key, dyn_mask))

        self.count_reads(valid.sum(-1) if pinned is not None else selection.lengths.sum(-1), selection.scored)
        return out.view(batch, q_heads, tokens, dim).transpose(1, 2).to(query.dtype).contiguous()


class PrefillAttention:
    """Exact causal attention over a context being prefilled, keeping its last `window` queries
    (the observation window whose queries calibrate thresholds)."""

    def __init__(self, window: int):
        self.window = window
        self.queries = None
        self.scaling = None

    def forward(self, module, query, key, value, attention_mask, scaling) -> torch.Tensor:
        q = query[0, :, -self.window :].float()
        self.queries = q if self.queries is None else torch.cat([self.queries, q], 1)[:, -self.window :]
        self.scaling = scaling
        # The context is one sequence without padding, so its mask is causal, aligned to the end of
        # the keys. Saying so (instead of passing the [T, L] boolean mask) lets SDPA pick a fused
        # kernel that never holds the T x L scores, which at long contexts would not fit.
        q_len, kv_len = query.shape[-2], key.shape[-2]
        out = F.scaled_dot_product_attention(
            query, key, value,
            attn_mask=None if q_len == kv_len else causal_lower_right(q_len, kv_len),
            is_causal=q_len == kv_len,
            scale=scaling,
            enable_gqa=key.shape[1] != query.shape[1],
        )
        return out.transpose(1, 2).contiguous()


def tagged(keys: torch.Tensor, attention) -> torch.Tensor:
    """A fresh view of `keys` that carries `attention` to the registered function."""
    keys = keys.view_as(keys)
    setattr(keys, LAYER_ATTR, attention)
    return keys

"""One fixed context, prefilled once, and the caches of every method built from that one prefill.

The dense prefill (keys, values, observation-window queries) is what `SqueezedCache.from_context`
computes too; here it is kept so that the flat index, the two-level index and the baselines are all
built from the same keys, each index once per context whatever the number of keeps and selection
rules (K-means does not depend on `keep`; only the selection rule does). Methods that share an
index form a group and answer in one batch, one block of rows per method.
"""

from __future__ import annotations

import dataclasses

import torch

from ..calibration import calibrate
from ..config import SqueezeConfig
from ..context import FixedContext, context_ids, prefill_context
from ..index import build_indices
from ..integrations import transformers as integration
from ..integrations.fingerprint import model_fingerprint
from ..integrations.generate import install_guard
from ..selection import SelectionRule
from . import baselines
from .methods import QUEST_PAGE, Method


# With `kernels`, these families read through the Triton kernels (full attention: every key).
KERNEL_FAMILIES = ("squeezed", "full")


def group_key(method: Method) -> tuple:
    """Methods with the same key share an index and a selection policy, and can share a batch."""
    if method.family == "squeezed":
        return ("squeezed", method.hierarchical, method.selection, method.rest, method.exact_prefill, bool(method.pin))
    return (method.family,)


def _row_rules(rules_per_method: list[list[SelectionRule]], rows: int, device) -> list[SelectionRule]:
    """Per layer, one rule whose thresholds/budgets are tensors [M * rows, 1, 1]: method-major rows."""
    merged = []
    for layer_rules in zip(*rules_per_method):
        if all(r.exact for r in layer_rules):
            merged.append(SelectionRule(exact=True))
            continue
        fields = {}
        for name in ("threshold", "budget", "coarse_threshold", "coarse_budget", "pin_budget"):
            values = [getattr(r, name) for r in layer_rules]
            if all(v is None for v in values):
                continue
            if any(v is None for v in values):
                raise ValueError(f"methods of one batch mix {name} and other rules")
            dtype = torch.long if "budget" in name else torch.float32
            fields[name] = torch.tensor(values, dtype=dtype, device=device).repeat_interleave(rows)[:, None, None]
        first = layer_rules[0]
        merged.append(SelectionRule(**fields, estimate_rest=first.estimate_rest, exact_prefill=first.exact_prefill))
    return merged


class ContextCaches:
    """Builds the caches of any methods over one fixed context, sharing all the work."""

    def __init__(self, model, ids, base: SqueezeConfig | None = None, progress: bool = False):
        self.model = model
        self.base = base or SqueezeConfig()
        integration.check_model(model)
        ids = context_ids(torch.as_tensor(ids), model, self.base)
        with torch.no_grad():
            self.keys, self.values, self.queries, self.scalings = prefill_context(model, ids, self.base, progress)
        self.ids = ids.cpu()
        self.fingerprint = model_fingerprint(model)
        install_guard(model)
        self._built = {}

    @property
    def num_tokens(self) -> int:
        return self.ids.numel()

    @property
    def clustered_tokens(self) -> int:
        return self.num_tokens - self.base.dense_tokens

    def _once(self, key, build):
        if key not in self._built:
            self._built[key] = build()
        return self._built[key]

    def _budget(self, keep: float) -> int:
        return max(1, round(keep * self.clustered_tokens))

    def _squeezed(self, hierarchical: bool):
        # one index for every squeezed method, with the value means that rest="estimate" reads
        config = dataclasses.replace(self.base, hierarchical=hierarchical, rest="estimate", pin=0.0)
        return self._once(("index", hierarchical), lambda: build_indices(self.keys, self.values, config))

    def _pages(self):
        base = self.base
        return self._once("pages", lambda: [
            baselines.page_index(k, v, base.sinks, base.window, QUEST_PAGE) for k, v in zip(self.keys, self.values)
        ])

    def _oracle(self):
        base = self.base
        return self._once("oracle", lambda: [
            baselines.oracle_index(k, v, base.sinks, base.window) for k, v in zip(self.keys, self.values)
        ])

    @torch.no_grad()
    def cache(self, methods: list[Method], rows: int = 1, kernels: bool = False) -> baselines.EvalCache:
        """One cache for methods of one group (see `group_key`), `rows` batch rows per method, method-major.

        Fork it per request. A single method gives a plain per-method cache (rows of one rule); with
        `kernels`, a single squeezed or full method reads through the Triton kernels where they can serve.
        """
        keys = {group_key(m) for m in methods}
        if len(keys) != 1:
            raise ValueError(f"methods {[m.name for m in methods]} do not share an index; group them by group_key")
        family = methods[0].family
        device = self.keys[0].device
        n_layers = len(self.keys)
        config = dataclasses.replace(self.base, keep=methods[0].keep if family != "full" else 1.0)
        policy, extras = baselines.centroid_policy, None
        if family == "full":
            layers = self._squeezed(False)
            rules = [SelectionRule(exact=True)] * n_layers
        elif family == "squeezed":
            m0 = methods[0]
            layers = self._squeezed(m0.hierarchical)
            config = m0.config(config)
            per_method = [calibrate(layers, self.queries, self.scalings, m.config(config)) for m in methods]
            rules = per_method[0] if len(methods) == 1 else _row_rules(per_method, rows, device)
        else:
            budgets = [[SelectionRule(budget=self._budget(m.keep))] * n_layers for m in methods]
            rules = _row_rules(budgets, rows, device)
            if family == "oracle":
                layers = self._oracle()
            else:
                pages = self._pages()
                layers = [p[0] for p in pages]
                if family == "quest":
                    policy, extras = baselines.quest_policy, [(p[1], p[2]) for p in pages]
                else:
                    policy = baselines.streaming_policy
        fixed = FixedContext(tuple(layers), tuple(rules), config, self.ids, self.fingerprint)
        kernels = kernels and family in KERNEL_FAMILIES and len(methods) == 1
        return baselines.EvalCache(fixed, policy, extras, kernels)

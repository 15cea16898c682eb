"""The methods compared, and how much of the KV cache each one costs (its budget).

Budget accounting follows the paper: a method's KV budget is the fraction of the clustered context
keys whose K and V it reads, plus its index metadata counted as keys only (a centroid is one key
vector, no value: half a token). So flat squeezed attention with 5% centroids at keep=0.3 costs
0.3 + 0.05 / 2 = 0.325, hierarchical adds its 1% coarse centroids (0.3 + 0.06 / 2 = 0.33), Quest
stores a min and a max key per page of 16 (2 / 16 / 2 = 0.0625 on top of what it reads), and
StreamingLLM and the oracle store nothing. Every method also reads the attention sinks, the
observation window and the question itself, identically; they are outside the budget.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from ..config import SqueezeConfig

KEEPS = (0.5, 0.3, 0.2, 0.1, 0.05)
FAMILIES = ("full", "squeezed", "quest", "streaming", "oracle")
QUEST_PAGE = 16


@dataclass(frozen=True)
class Method:
    """One way of reading the fixed context.

    family: "full" (every key), "squeezed" (the method), "quest" (page min/max key bounds),
        "streaming" (sinks + recent window only), "oracle" (exact top-k by true attention score).
    keep: fraction of the clustered context keys selected (ignored for "full").
    selection / hierarchical: the squeezed variant ("topk" or "threshold"; flat or two-level).
    rest: squeezed, with the clusters left out estimated (SqueezeConfig.rest="estimate"; "+rest" in
        its name): its value means are metadata too, as many as the centroids.
    exact_prefill / pin: squeezed, SqueezeConfig.prefill="exact" ("+exact") and SqueezeConfig.pin
        ("+pin0.5": the share of keep pinned). The input's prefill reads every key once per request;
        the budget counts what each generated token reads. Without them, the paper's lookup.
    """

    family: str
    keep: float = 1.0
    selection: str = "topk"
    hierarchical: bool = False
    rest: bool = False
    exact_prefill: bool = False
    pin: float = 0.0

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"unknown method family {self.family!r}; choose from {FAMILIES}")
        if not 0.0 < self.keep <= 1.0:
            raise ValueError(f"method {self.family}: keep={self.keep} must lie in (0, 1]")
        if self.family == "squeezed":
            self.config()
        elif self.rest or self.exact_prefill or self.pin:
            raise ValueError(f"method {self.family}: only squeezed methods take +rest, +exact or +pin")

    def config(self, base: SqueezeConfig | None = None) -> SqueezeConfig:
        """A squeezed method's configuration (on top of `base`)."""
        return dataclasses.replace(base or SqueezeConfig(), keep=self.keep, selection=self.selection,
                                   hierarchical=self.hierarchical, rest="estimate" if self.rest else "drop",
                                   prefill="exact" if self.exact_prefill else "lookup", pin=self.pin)

    @property
    def name(self) -> str:
        if self.family == "full":
            return "full"
        if self.family == "squeezed":
            options = "+rest" * self.rest + "+exact" * self.exact_prefill + (f"+pin{self.pin:g}" if self.pin else "")
            return f"{'hier' if self.hierarchical else 'flat'}-{self.selection}{options}-{self.keep:g}"
        return f"{self.family}-{self.keep:g}"

    @property
    def label(self) -> str:
        """The line this method belongs to in tables and plots (its name without the keep)."""
        return self.name if self.family == "full" else self.name.rsplit("-", 1)[0]

    @property
    def overhead(self) -> float:
        """Index metadata, in the budget's unit (keys only count half a token)."""
        config = SqueezeConfig()
        if self.family == "squeezed":
            ratio = config.centroid_ratio + (config.coarse_ratio if self.hierarchical else 0.0)
            return ratio / 2 * (2 if self.rest else 1)
        if self.family == "quest":
            return 2 / QUEST_PAGE / 2
        return 0.0

    @property
    def budget(self) -> float:
        return 1.0 if self.family == "full" else round(self.keep + self.overhead, 6)


def at_budget(family: str, budget: float, **kwargs) -> Method:
    """The method of `family` whose budget (keep + its metadata) is `budget`."""
    overhead = Method(family, **kwargs).overhead
    keep = round(budget - overhead, 6)
    if keep <= 0:
        raise ValueError(f"{family} cannot meet a budget of {budget}: its metadata alone costs {overhead}")
    return Method(family, keep=keep, **kwargs)


def default_methods(keeps=KEEPS) -> list[Method]:
    """Full attention; squeezed flat/hierarchical x top-k/threshold at each keep; the baselines at the
    budgets of flat squeezed attention; and Quest reading as many tokens as squeezed keep=0.1."""
    methods = [Method("full")]
    for hierarchical in (False, True):
        for selection in ("topk", "threshold"):
            methods += [Method("squeezed", k, selection, hierarchical) for k in keeps]
    budgets = [Method("squeezed", k).budget for k in keeps]
    for family in ("quest", "streaming", "oracle"):
        methods += [at_budget(family, b) for b in budgets]
    if 0.1 in keeps:
        methods.append(Method("quest", 0.1))
    return methods


_SPEC = re.compile(r"^(full|flat|hier|quest|streaming|oracle)(?:-(topk|threshold))?((?:\+(?:rest|exact|pin[0-9.]+))*)(?:([-@])([0-9.]+))?$")


def parse_methods(spec: str | None) -> list[Method]:
    """'default', or a comma-separated list such as 'full,flat-topk-0.3,hier-threshold-0.1,quest@0.125'.

    `-X` sets keep (fraction of keys selected); `@X` sets the budget (keep + metadata). `+rest` after
    a squeezed method's selection estimates the clusters left out (flat-topk+rest@0.125).
    """
    if spec in (None, "", "default"):
        return default_methods()
    methods = []
    for item in spec.split(","):
        item = item.strip()
        match = _SPEC.match(item)
        if not match:
            raise ValueError(
                f"cannot read method {item!r}: use full, flat-topk-KEEP, flat-threshold-KEEP, hier-topk-KEEP, "
                "hier-threshold-KEEP (options after topk/threshold: +rest, +exact, +pinFRACTION: flat-topk+exact+pin0.05-KEEP), quest-KEEP, streaming-KEEP, "
                "oracle-KEEP, or @BUDGET instead of -KEEP"
            )
        kind, selection, options, sep, value = match.groups()
        if kind == "full":
            methods.append(Method("full"))
            continue
        if value is None:
            raise ValueError(f"method {item!r} needs a keep (-0.3) or a budget (@0.325)")
        kwargs = {}
        family = kind
        if kind in ("flat", "hier"):
            family = "squeezed"
            opts = options.split("+")[1:]
            pins = [float(o[3:]) for o in opts if o.startswith("pin")]
            kwargs = dict(selection=selection or "topk", hierarchical=kind == "hier", rest="rest" in opts,
                          exact_prefill="exact" in opts, pin=pins[0] if pins else 0.0)
        elif selection or options:
            raise ValueError(f"method {item!r}: only flat/hier take a selection (topk or threshold) or +rest")
        methods.append(at_budget(family, float(value), **kwargs) if sep == "@" else Method(family, float(value), **kwargs))
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise ValueError(f"methods listed twice: {sorted({n for n in names if names.count(n) > 1})}")
    return methods

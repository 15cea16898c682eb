"""`SqueezeConfig`: every knob of the method, validated when it is built."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

SELECTIONS = ("threshold", "topk")
THRESHOLD_SCOPES = ("layer", "global")
RESTS = ("drop", "estimate")
PREFILLS = ("lookup", "exact")


@dataclass(frozen=True)
class SqueezeConfig:
    """How a fixed context is squeezed.

    Attributes:
        keep: target fraction of the clustered fixed-context keys that attention reads, in (0, 1].
            1.0 reads them all (exact attention).
        centroid_ratio: clusters per clustered key (the paper uses 5%).
        hierarchical: add a coarse level of centroids so that most fine centroids are never scored.
        coarse_ratio: coarse clusters per clustered key (the paper uses 1%).
        coarse_margin: the coarse pass keeps `coarse_margin * keep` of the keys (capped at 1), leaving
            the fine pass room to choose.
        window: the last `window` context tokens (observation window) are never clustered; they are
            always attended and their queries calibrate the threshold.
        sinks: the first `sinks` context tokens are never clustered and always attended. Attention
            sinks draw a large, concentrated share of attention in many layers, which a cluster
            centroid cannot represent (measured in README.md). 0 gives the paper's setup.
        selection: "topk" (a fixed budget of `keep` keys per KV head per selection) or "threshold"
            (a threshold calibrated on the observation window, as the paper). A threshold keeps
            `keep` on average but lets some selections starve, which loses facts that top-k keeps
            (README.md, "departures").
        threshold_scope: "layer" calibrates one threshold per layer (each layer reads about `keep`
            of its keys); "global" one threshold for all layers, as the paper, which starves some
            layers and overfeeds others.
        rest: what attention does with the clusters the lookup leaves out. "drop" ignores them (the
            paper); "estimate" adds each one as N_j keys equal to its centroid carrying its mean
            value (attention weight N_j exp(q . c_j), value mean_j), so that the keys left out still
            share the softmax's mass. It reads the clusters' value means besides the centroids
            (another C x D, built with the index only for rest="estimate": the same as the centroids in
            the keys-only accounting of a budget).
        prefill: how the user input's prefill reads the fixed context. "exact" (default) reads every
            key once per request, so that the input's attention over the context (where a question
            finds its facts) is exact; generated tokens use the lookup. "lookup" (the paper) selects
            clusters for the input as for a generated token (one selection for the whole input).
        pin: with prefill="exact", the share of `keep` given to keys pinned by the input: the keys
            around those that drew most of the input's exact attention (the question's evidence and
            the text that follows it, which centroids rank far too low when a key differs from its
            cluster's mean) stay read by every generated token of the request; the lookup fills the
            rest of `keep`. Every input step read exactly (each chunk of a chunked prefill) adds its
            attention, and the pins follow the input so far. 0 pins nothing (the paper). Measured in
            EVAL.md (its section on the default).
        kmeans_iters: Lloyd iterations of K-means.
        seed: seed of the K-means initialisation.
        prefill_chunk: tokens per forward pass when the fixed context is prefilled.
    """

    keep: float = 0.3
    centroid_ratio: float = 0.05
    hierarchical: bool = False
    coarse_ratio: float = 0.01
    coarse_margin: float = 2.0
    window: int = 100
    sinks: int = 4
    selection: str = "topk"
    threshold_scope: str = "layer"
    rest: str = "drop"
    prefill: str = "exact"
    pin: float = 0.5
    kmeans_iters: int = 20
    seed: int = 0
    prefill_chunk: int = 2048

    def __post_init__(self):
        def fail(field, why):
            raise ValueError(f"SqueezeConfig.{field}={getattr(self, field)!r} is invalid: {why}")

        if not 0.0 < self.keep <= 1.0:
            fail("keep", "it is the fraction of fixed-context keys attended and must lie in (0, 1]")
        if not 0.0 < self.centroid_ratio <= 1.0:
            fail("centroid_ratio", "it must lie in (0, 1] (the paper uses 0.05)")
        if not isinstance(self.hierarchical, bool):
            fail("hierarchical", "it must be True or False")
        if not 0.0 < self.coarse_ratio <= self.centroid_ratio:
            fail("coarse_ratio", f"it must lie in (0, centroid_ratio={self.centroid_ratio}]")
        if not self.coarse_margin >= 1.0:
            fail("coarse_margin", "it must be >= 1 (the coarse pass may not keep less than `keep`)")
        if not isinstance(self.window, int) or self.window < 1:
            fail("window", "it must be a positive number of tokens (the paper uses 100)")
        if not isinstance(self.sinks, int) or self.sinks < 0:
            fail("sinks", "it must be a number of tokens >= 0")
        if self.selection not in SELECTIONS:
            fail("selection", f"choose one of {SELECTIONS}")
        if self.threshold_scope not in THRESHOLD_SCOPES:
            fail("threshold_scope", f"choose one of {THRESHOLD_SCOPES}")
        if self.rest not in RESTS:
            fail("rest", f"choose one of {RESTS}")
        if self.prefill not in PREFILLS:
            fail("prefill", f"choose one of {PREFILLS}")
        if not 0.0 <= self.pin < 1.0:
            fail("pin", "it is the share of keep pinned per request and must lie in [0, 1)")
        if self.pin > 0 and self.prefill != "exact":
            fail("pin", "pinned keys come from the exact attention of the input: set prefill='exact' (or pin=0)")
        if self.pin > 0 and self.rest == "estimate":
            fail("pin", "pinned keys and rest='estimate' do not combine: set pin=0 to estimate the rest")
        if not isinstance(self.kmeans_iters, int) or self.kmeans_iters < 1:
            fail("kmeans_iters", "it must be a positive integer")
        if not isinstance(self.seed, int):
            fail("seed", "it must be an integer")
        if not isinstance(self.prefill_chunk, int) or self.prefill_chunk < 1:
            fail("prefill_chunk", "it must be a positive number of tokens")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "SqueezeConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown SqueezeConfig fields {sorted(unknown)}; known fields: {sorted(known)}")
        return cls(**data)

    @property
    def dense_tokens(self) -> int:
        """Context tokens that are always attended: the sinks and the observation window."""
        return self.sinks + self.window

    def num_clusters(self, clustered_tokens: int) -> int:
        return max(1, round(self.centroid_ratio * clustered_tokens))

    def num_coarse_clusters(self, clustered_tokens: int) -> int:
        return min(self.num_clusters(clustered_tokens), max(1, round(self.coarse_ratio * clustered_tokens)))

    @property
    def lookup_keep(self) -> float:
        """The share of the clustered keys that the lookup selects (what pinned keys leave of `keep`)."""
        return self.keep * (1.0 - self.pin)

    @property
    def coarse_keep(self) -> float:
        return min(1.0, self.coarse_margin * self.keep)

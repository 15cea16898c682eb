import pytest

from hf_squeeze import SqueezeConfig


@pytest.mark.parametrize(
    "field, value",
    [
        ("keep", 0.0),
        ("keep", 1.5),
        ("keep", -0.1),
        ("centroid_ratio", 0.0),
        ("coarse_ratio", 0.2),  # larger than centroid_ratio
        ("coarse_margin", 0.5),
        ("window", 0),
        ("sinks", -1),
        ("selection", "random"),
        ("kmeans_iters", 0),
        ("prefill_chunk", 0),
        ("hierarchical", "yes"),
        ("rest", "guess"),
        ("prefill", "dense"),
        ("pin", 1.0),
        ("pin", -0.1),
    ],
)
def test_invalid_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"SqueezeConfig\.{field}="):
        SqueezeConfig(**{field: value})


def test_round_trip_and_unknown_fields():
    config = SqueezeConfig(keep=0.1, hierarchical=True, selection="topk")
    assert SqueezeConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown SqueezeConfig fields"):
        SqueezeConfig.from_dict({**config.to_dict(), "colour": "red"})


def test_cluster_counts():
    config = SqueezeConfig(centroid_ratio=0.05, coarse_ratio=0.01)
    assert config.num_clusters(2000) == 100
    assert config.num_coarse_clusters(2000) == 20
    assert config.coarse_keep == min(1.0, config.coarse_margin * config.keep)


@pytest.mark.parametrize("keep", [0.0, 1.01, -1.0])
def test_keep_outside_the_unit_interval(keep):
    with pytest.raises(ValueError, match=r"SqueezeConfig\.keep=.*\(0, 1\]"):
        SqueezeConfig(keep=keep)


@pytest.mark.parametrize("settings, why", [
    (dict(prefill="lookup"), "prefill='exact'"),
    (dict(rest="estimate"), "set pin=0"),
])
def test_pinned_keys_need_an_exact_prefill_and_no_rest_estimate(settings, why):
    with pytest.raises(ValueError, match=rf"SqueezeConfig\.pin=.*{why}"):
        SqueezeConfig(**settings)
    SqueezeConfig(pin=0.0, **settings)  # the paper's lookup, and the estimated rest, without pins


def test_defaults_pin_half_of_keep():
    config = SqueezeConfig(keep=0.2)
    assert (config.prefill, config.pin, config.rest) == ("exact", 0.5, "drop")
    assert config.lookup_keep == pytest.approx(0.1)

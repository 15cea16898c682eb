import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans

from hf_squeeze.clustering import (
    cluster_means,
    cosine_objective,
    head_seeds,
    kmeans,
    uniform,
)


def clustered_points(heads=3, n=600, dim=16, k=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(heads, k, dim, generator=g)
    which = torch.randint(k, (heads, n), generator=g)
    return centers[torch.arange(heads)[:, None], which] + 0.3 * torch.randn(heads, n, dim, generator=g)


def sklearn_objective(points, k, iters, seed=0):
    total = []
    for h in range(points.shape[0]):
        x = F.normalize(points[h], dim=-1).numpy().astype(np.float64)
        labels = KMeans(k, init="k-means++", n_init=1, max_iter=iters, random_state=seed).fit(x).labels_
        total.append(float(cosine_objective(points[h : h + 1], torch.as_tensor(labels)[None], k)))
    return np.array(total)


@pytest.mark.parametrize("k", [12, 40, 80])
def test_quality_matches_sklearn_on_clustered_data(k):
    # As many clusters as the data has, or more (the method uses 5% of the keys: many clusters).
    # Single runs depend on the luck of the seeding draw (for both; with k = 12 one unlucky draw
    # merges two true clusters and costs ~10%); compare totals over enough seeds.
    points = clustered_points(k=12)
    seeds = range(8)
    ours = sum(cosine_objective(points, kmeans(points, k, iters=30, seed=s), k).sum().item() for s in seeds)
    ref = sum(sklearn_objective(points, k, iters=30, seed=s).sum() for s in seeds)
    assert ours <= ref * 1.01, (ours, ref)


def test_quality_matches_sklearn_on_random_model_keys(llama, context):
    from hf_squeeze import SqueezeConfig
    from hf_squeeze.context import prefill_context

    with torch.no_grad():
        keys, *_ = prefill_context(llama, context, SqueezeConfig(), progress=False)
    points = torch.cat(keys).float()  # all layers x KV heads of the tiny model
    k = 30
    ours = cosine_objective(points, kmeans(points, k, iters=20), k).numpy()
    ref = sklearn_objective(points, k, iters=20)
    assert ours.sum() <= ref.sum() * 1.01, (ours.sum(), ref.sum())


def test_quality_matches_sklearn_on_smollm2_keys_of_an_essay(smollm2):
    # Real keys: SmolLM2 over Paul Graham's essays, 5% centroids as the method uses, every third layer.
    from hf_squeeze import SqueezeConfig
    from hf_squeeze.assets import essays_text
    from hf_squeeze.context import prefill_context

    model, tokenizer = smollm2
    ids = torch.tensor(tokenizer(essays_text()[:8000])["input_ids"][:1000])
    config = SqueezeConfig()
    with torch.no_grad():
        keys, *_ = prefill_context(model, ids, config, progress=False)
    points = torch.cat(keys[::3])[:, config.sinks : -config.window].float()
    k = config.num_clusters(points.shape[1])
    ours = cosine_objective(points, kmeans(points, k, iters=20), k).numpy()
    ref = sklearn_objective(points, k, iters=20)
    assert ours.sum() <= ref.sum() * 1.01, (ours.sum() / ref.sum())


def test_reproducible_and_seed_dependent():
    points = clustered_points()
    a, b = kmeans(points, 12, 10, seed=3), kmeans(points, 12, 10, seed=3)
    assert torch.equal(a, b)
    assert not torch.equal(a, kmeans(points, 12, 10, seed=4))


def test_counter_based_uniforms():
    seeds = torch.tensor([7, -3, 2**40 + 5])
    u = uniform(seeds, 4, 100_000)
    assert u.dtype == torch.float32 and float(u.min()) > 0 and float(u.max()) <= 1
    assert abs(float(u.mean()) - 0.5) < 0.005 and abs(float(u.std()) - 12**-0.5) < 0.005
    assert torch.equal(uniform(seeds[1:2], 4, 100_000)[0], u[1])  # a row depends on its own seed only
    assert torch.equal(uniform(seeds, 4, 10), u[:, :10])  # and on the column, not on n
    assert not torch.equal(uniform(seeds, 5, 10), u[:, :10])  # streams differ
    assert float((u[0] - u[1]).abs().mean()) > 0.2  # seeds differ
    # neighbouring counters are not correlated
    assert abs(float(torch.corrcoef(torch.stack([u[0, :-1], u[0, 1:]]))[0, 1])) < 0.02


def test_a_heads_clusters_do_not_depend_on_its_batch():
    # How layers are grouped for K-means (and on which GPU each sits) must not change any head's clusters.
    points = clustered_points(heads=4)
    seeds = head_seeds(4, seed=2)
    together = kmeans(points, 12, 10, seed=seeds)
    assert torch.equal(together, kmeans(points, 12, 10, seed=2))
    for h in range(4):
        assert torch.equal(kmeans(points[h : h + 1], 12, 10, seed=seeds[h : h + 1]), together[h : h + 1])
    assert torch.equal(kmeans(points[2:], 12, 10, seed=seeds[2:]), together[2:])
    with pytest.raises(ValueError, match="one per head"):
        kmeans(points, 12, 10, seed=seeds[:3])


def test_duplicate_points_leave_no_crash_and_valid_labels():
    # 5 distinct points repeated: asking for 8 clusters forces empty clusters.
    base = torch.randn(1, 5, 8)
    points = base.repeat(1, 20, 1)
    labels = kmeans(points, 8, 10)
    assert labels.shape == (1, 100)
    assert int(labels.min()) >= 0 and int(labels.max()) < 8
    means, counts = cluster_means(points, labels, 8)
    assert int(counts.sum()) == 100
    assert torch.isfinite(means).all()
    # every point sits in a cluster whose mean is that point (all members are identical)
    assert torch.allclose(means[0, labels[0]], points[0], atol=1e-5)


def test_cluster_means_are_means_of_raw_points():
    points = torch.randn(2, 50, 4)
    labels = torch.randint(6, (2, 50))
    means, counts = cluster_means(points, labels, 6)
    for h in range(2):
        for c in range(6):
            members = points[h][labels[h] == c]
            assert counts[h, c] == len(members)
            if len(members):
                assert torch.allclose(means[h, c], members.mean(0), atol=1e-6)
            else:
                assert torch.all(means[h, c] == 0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="1 <= k <= n"):
        kmeans(torch.randn(1, 4, 3), 5, 1)
    with pytest.raises(ValueError, match="heads, n, dim"):
        kmeans(torch.randn(4, 3), 2, 1)

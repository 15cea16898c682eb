"""The offline step at scale: chunked prefill into preallocated buffers, CPU storage, `prepare`."""

import torch
from transformers import DynamicCache

from hf_squeeze import SqueezedCache, SqueezeConfig, cache_kwargs
from hf_squeeze.cache import _prefill_context
from hf_squeeze.cli import main
from hf_squeeze.integrations.fingerprint import model_fingerprint


def test_chunked_prefill_equals_one_pass(llama, context):
    # Chunks of 64 tokens write into buffers allocated once; the keys/values and the window
    # queries must be those of one dense pass over the whole context.
    with torch.no_grad():
        chunked = _prefill_context(llama, context, SqueezeConfig(prefill_chunk=64), progress=False)
        whole = _prefill_context(llama, context, SqueezeConfig(prefill_chunk=10_000), progress=False)
        dense = DynamicCache()
        llama.base_model(input_ids=context[None], **cache_kwargs(llama.base_model, dense), use_cache=True)
    for layer, (k, v) in enumerate(zip(chunked[0], chunked[1])):
        assert k.shape == (2, context.numel(), 16)
        torch.testing.assert_close(k, whole[0][layer], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(v, whole[1][layer], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(k, dense.layers[layer].keys[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(chunked[2][layer], whole[2][layer], atol=1e-5, rtol=1e-5)
        assert chunked[2][layer].shape[1] == SqueezeConfig().window


def test_storage_on_cpu_gives_the_same_index(llama, context):
    config = SqueezeConfig(keep=0.2, hierarchical=True, l1_ratio=0.01)
    a = SqueezedCache.from_context(llama, context, config, progress=False)
    b = SqueezedCache.from_context(llama, context, config, progress=False, storage="cpu")
    for x, y in zip(a.fixed.layers, b.fixed.layers):
        for name, tensor in x.tensors().items():
            assert torch.equal(tensor, y.tensors()[name]), name
    assert a.fixed.rules == b.fixed.rules
    stats = a.build_stats
    assert stats["context_tokens"] == context.numel() and stats["prefill_seconds"] > 0 and stats["index_seconds"] > 0
    moved = a.to("cpu", non_blocking=True)
    assert moved.fixed.layers[0].keys.data_ptr() != 0 and torch.equal(moved.fixed.layers[0].keys, a.fixed.layers[0].keys)


def test_prepare_command_writes_a_cache_for_the_file(smollm2, tmp_path, capsys, monkeypatch):
    import hf_squeeze
    from hf_squeeze.demo import essays_text

    model, tokenizer = smollm2
    asked = {}

    def default_model(dtype, device):  # the session's SmolLM2, instead of loading it a second time
        asked.update(dtype=dtype, device=device)
        return model, tokenizer

    monkeypatch.setattr(hf_squeeze, "load_default_model", default_model)
    text = essays_text()[:1500]
    (tmp_path / "doc.txt").write_text(text)
    out = tmp_path / "doc.squeeze"
    code = main(["prepare", "--context", str(tmp_path / "doc.txt"), "--out", str(out), "--keep", "0.3",
                 "--hierarchical", "--kmeans-iters", "5", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    assert "wrote" in capsys.readouterr().out
    assert asked == {"dtype": torch.float32, "device": "cpu"}
    cache = SqueezedCache.load(out, model)
    assert torch.equal(cache.fixed.context_ids, torch.tensor(tokenizer(text)["input_ids"]))
    assert cache.fixed.config.kmeans_iters == 5 and cache.fixed.config.hierarchical
    assert cache.fixed.fingerprint == model_fingerprint(model)


def test_prepare_refuses_a_missing_model(tmp_path, capsys):
    (tmp_path / "doc.txt").write_text("some text")
    code = main(["prepare", "--model", str(tmp_path / "nope"), "--context", str(tmp_path / "doc.txt"),
                 "--out", str(tmp_path / "x.squeeze")])
    assert code == 2
    assert "expected a Hugging Face model folder or a .gguf file" in capsys.readouterr().err

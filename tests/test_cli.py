import json

import torch

from hf_squeeze import SqueezeConfig, SqueezedCache
from hf_squeeze.cli import main
from hf_squeeze.integrations.fingerprint import model_fingerprint


def test_info_prints_the_header(llama, context, tmp_path, capsys):
    path = SqueezedCache.from_context(llama, context, SqueezeConfig(keep=0.1), progress=False).save(tmp_path / "c.squeeze")
    assert main(["info", str(path)]) == 0
    header = json.loads(capsys.readouterr().out)
    assert header["config"]["keep"] == 0.1
    assert header["context_tokens"] == context.numel()
    assert header["fingerprint"]["model_type"] == "llama"


def test_bad_configuration_is_a_clear_error(capsys):
    assert main(["demo", "--keep", "1.5"]) == 2
    assert "SqueezeConfig.keep=1.5 is invalid" in capsys.readouterr().err


def test_prepare_command_writes_a_cache_for_the_file(smollm2, tmp_path, capsys, monkeypatch):
    import hf_squeeze
    from hf_squeeze.assets import essays_text

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

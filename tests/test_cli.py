import json

from hf_squeeze import SqueezedCache, SqueezeConfig
from hf_squeeze.cli import main


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


def test_prepare_then_load(smollm2, tmp_path, capsys):
    """`hf-squeeze prepare` on the embedded model (no warning from the package's own calls: the suite
    turns FutureWarnings into errors), and the file serves generate."""
    import torch

    from hf_squeeze.demo import essays_text

    model, tokenizer = smollm2
    text = tokenizer.decode(tokenizer(essays_text()[:4000])["input_ids"][:500])
    doc = tmp_path / "doc.txt"
    doc.write_text(text, encoding="utf-8")
    out = tmp_path / "doc.squeeze"
    assert main(["prepare", "--context", str(doc), "--out", str(out), "--keep", "0.3"]) == 0
    assert "Prompts must start with these" in capsys.readouterr().out
    cache = SqueezedCache.load(out, model)
    ids = torch.tensor(tokenizer(text)["input_ids"] + tokenizer(" What is this about?")["input_ids"])[None]
    assert model.generate(ids, cache=cache.fork(), max_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3

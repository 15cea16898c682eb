"""The embedded model's files (`hf_squeeze/assets.py`): a GGUF file is read through a de-quantised
copy made at its first load, which holds what transformers' own GGUF load gives."""


import pytest
import torch

from hf_squeeze import assets
from hf_squeeze.integrations.fingerprint import model_fingerprint


def test_a_gguf_file_is_read_through_its_dequantised_copy(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_SQUEEZE_CACHE", str(tmp_path / "cache"))
    gguf = assets.default_model_dir() / assets.DEFAULT_GGUF
    direct = []  # what transformers' own load of the GGUF file gave, during the conversion
    load_gguf = assets._load_gguf
    monkeypatch.setattr(assets, "_load_gguf", lambda path: direct.append(load_gguf(path)) or direct[-1])
    model, tokenizer = assets.load_model(gguf)
    folder = assets.converted_folder(gguf)
    assert len(direct) == 1 and folder.parent == tmp_path / "cache"
    assert {p.name for p in folder.iterdir()} >= {"model.safetensors", "config.json", "tokenizer.json"}
    reference, reference_tokenizer = direct[0]
    ours, theirs = model.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert model_fingerprint(model) == model_fingerprint(reference)
    assert getattr(model.config, "quantization_config", None) is None
    chat = [{"role": "user", "content": "What is the passcode? 7351 é"}]
    assert tokenizer.apply_chat_template(chat) == reference_tokenizer.apply_chat_template(chat)

    # later loads read the copy, not the GGUF file, in the dtype asked for
    monkeypatch.setattr(assets, "_load_gguf", lambda path: pytest.fail("the GGUF file was read again"))
    again, _ = assets.load_model(gguf, dtype=torch.bfloat16)
    assert again.dtype == torch.bfloat16
    assert torch.equal(again.model.embed_tokens.weight, reference.model.embed_tokens.weight.bfloat16())


def test_an_unwritable_cache_warns_and_reads_the_gguf_file(tmp_path, monkeypatch):
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("HF_SQUEEZE_CACHE", str(tmp_path / "a-file" / "cache"))
    monkeypatch.setattr(assets, "_load_gguf", lambda path: pytest.fail("converted where nothing can be written"))
    gguf = assets.default_model_dir() / assets.DEFAULT_GGUF
    with pytest.warns(UserWarning, match="cannot keep a de-quantised copy .* set HF_SQUEEZE_CACHE"):
        folder, kwargs = assets._checkpoint(gguf)
    assert (folder, kwargs) == (gguf.parent, {"gguf_file": gguf.name})


def test_a_path_that_is_no_model_is_refused(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    for path in (tmp_path / "weights.bin", tmp_path / "missing"):
        with pytest.raises(FileNotFoundError, match="expected a Hugging Face model folder or a .gguf file"):
            assets.load_model(path)

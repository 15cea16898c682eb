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

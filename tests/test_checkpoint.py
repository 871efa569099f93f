import json

import pytest
import torch

from gptstack.checkpoint import CheckpointError, load_model, load_train_state, save_checkpoint, verify
from gptstack.config import preset
from gptstack.model import GPT
from gptstack.tokenizer import load_tokenizer

from conftest import run_cli


def make(tmp_path):
    torch.manual_seed(0)
    model = GPT(preset("tiny").model)
    state = {"step": 7, "optimizer": {"state": {0: {"exp_avg": torch.ones(3)}}, "param_groups": [{"lr": 0.1, "betas": (0.9, 0.95)}]},
             "rng": [{"cpu": torch.get_rng_state(), "cuda": None}]}
    save_checkpoint(tmp_path / "ck", model, load_tokenizer("gpt2"), meta={"note": "x"}, train_state=state)
    return model, state


def test_round_trip_weights_and_state(tmp_path):
    model, state = make(tmp_path)
    loaded, tok, config = load_model(tmp_path / "ck")
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    assert tok.encode("Hello world") == [15496, 995] and config["meta"] == {"note": "x"}
    restored = load_train_state(tmp_path / "ck")
    assert restored["step"] == 7 and restored["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.95)
    assert torch.equal(restored["optimizer"]["state"][0]["exp_avg"], torch.ones(3))
    assert torch.equal(restored["rng"][0]["cpu"], state["rng"][0]["cpu"])
    assert not any(p.suffix in (".pt", ".bin", ".pkl") for p in (tmp_path / "ck").iterdir())


def test_overwrite_is_atomic_and_leaves_no_temp_dirs(tmp_path):
    make(tmp_path)
    make(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_corrupted_file_is_detected(tmp_path):
    make(tmp_path)
    weights = tmp_path / "ck" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted or truncated"):
        load_model(tmp_path / "ck")


def test_truncated_and_missing(tmp_path):
    make(tmp_path)
    weights = tmp_path / "ck" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="SHA-256 mismatch"):
        verify(tmp_path / "ck")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nothing")
    (tmp_path / "plain").mkdir()
    with pytest.raises(CheckpointError, match="not a gptstack checkpoint"):
        load_model(tmp_path / "plain")


def test_cli_reports_corruption_without_traceback(tmp_path):
    make(tmp_path)
    sums = tmp_path / "ck" / "checksums.json"
    data = json.loads(sums.read_text())
    data["config.json"] = "0" * 64
    sums.write_text(json.dumps(data))
    proc = run_cli("generate", "--checkpoint", str(tmp_path / "ck"), "--prompt", "hi")
    assert proc.returncode == 2
    assert "config.json is corrupted" in proc.stderr and "Traceback" not in proc.stderr

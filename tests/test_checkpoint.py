import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from gptstack.checkpoint import CheckpointError, load_model, load_train_state, save_checkpoint, verify, with_config
from gptstack.config import preset
from gptstack.files import sha256_file
from gptstack.model import GPT, QKV_PROJECTIONS
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


def fused_qkv_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` as gptstack saved it when q, k and v were one projection, ``c_attn``: rows q; k; v,
    and a LoRA adapter's A (then one for all three) once."""
    out = {}
    for key, tensor in state.items():
        head, _, name = key.rpartition(".")
        attn, _, projection = head.rpartition(".")
        if projection not in QKV_PROJECTIONS:
            out[key] = tensor
        elif projection == "q_proj":
            parts = [state[f"{attn}.{p}.{name}"] for p in QKV_PROJECTIONS]
            if name == "lora_A":
                assert all(torch.equal(part, parts[0]) for part in parts), "a fused adapter had one A"
            out[f"{attn}.c_attn.{name}"] = parts[0] if name == "lora_A" else torch.cat(parts)
    return out


def saved_before_the_qkv_split(directory: Path) -> Path:
    """Rewrite a checkpoint as gptstack wrote it when q, k and v were one projection, ``c_attn``
    (weights, adapters, adapter targets), with checksums that match."""
    for name in ("model.safetensors", "adapter.safetensors"):
        if (directory / name).exists():
            save_file(fused_qkv_state(load_file(directory / name)), directory / name)
    config = json.loads((directory / "config.json").read_text())
    if config.get("adapter"):
        targets = config["adapter"]["targets"]
        config["adapter"]["targets"] = ["c_attn"] + [t for t in targets if t not in QKV_PROJECTIONS]
        (directory / "config.json").write_text(json.dumps(config))
    sums = {p.name: sha256_file(p) for p in sorted(directory.iterdir()) if p.name != "checksums.json"}
    (directory / "checksums.json").write_text(json.dumps(sums))
    return directory


def test_checkpoints_saved_before_the_qkv_split_still_load(tmp_path):
    model, _ = make(tmp_path)
    saved_before_the_qkv_split(tmp_path / "ck")
    assert "transformer.h.0.attn.c_attn.weight" in load_file(tmp_path / "ck" / "model.safetensors")
    loaded, tok, _ = load_model(tmp_path / "ck")
    assert model.state_dict().keys() == loaded.state_dict().keys()
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    save_checkpoint(tmp_path / "again", loaded, tok)       # the split tensors are tensors of their own
    # init_from: load_model, then with_config into the run's model config
    moved = with_config(loaded, dataclasses.replace(loaded.config, resid_pdrop=0.0))
    assert torch.equal(moved.transformer.h[1].attn.v_proj.bias, model.transformer.h[1].attn.v_proj.bias)
    # an old checkpoint that lacks a weight is still refused
    state = load_file(tmp_path / "ck" / "model.safetensors")
    del state["transformer.h.1.attn.c_attn.bias"]
    save_file(state, tmp_path / "ck" / "model.safetensors")
    saved_before_the_qkv_split(tmp_path / "ck")
    with pytest.raises(CheckpointError, match=r"lacks \['transformer.h.1.attn.k_proj.bias'"):
        load_model(tmp_path / "ck")

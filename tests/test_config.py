import json

import pytest

from gptstack.config import (ConfigError, PRESETS, build_train_config, count_parameters, model_info, preset)
from gptstack.model import GPT

from conftest import run_cli

# GPT-3 paper, Table 2.1: n_params, n_layers, d_model, n_heads, d_head, learning rate
TABLE_2_1 = {
    "gpt3-small": (125e6, 12, 768, 12, 64, 6.0e-4),
    "gpt3-medium": (350e6, 24, 1024, 16, 64, 3.0e-4),
    "gpt3-large": (760e6, 24, 1536, 16, 96, 2.5e-4),
    "gpt3-xl": (1.3e9, 24, 2048, 16, 128, 2.0e-4),   # the paper prints 24 heads; 24 does not divide 2048
    "gpt3-2.7b": (2.7e9, 32, 2560, 32, 80, 1.6e-4),
    "gpt3-6.7b": (6.7e9, 32, 4096, 32, 128, 1.2e-4),
    "gpt3-13b": (13.0e9, 40, 5120, 40, 128, 1.0e-4),
    "gpt3-175b": (175.0e9, 96, 12288, 96, 128, 0.6e-4),
}


@pytest.mark.parametrize("name", TABLE_2_1)
def test_gpt3_presets_match_the_paper(name):
    n_params, n_layer, d_model, n_heads, d_head, lr = TABLE_2_1[name]
    p = preset(name)
    assert (p.model.n_layer, p.model.n_embd, p.model.n_head, p.model.head_dim) == (n_layer, d_model, n_heads, d_head)
    assert p.model.block_size == 2048 and p.model.attention == "alternating_banded"
    assert p.learning_rate == pytest.approx(lr)
    assert count_parameters(p.model)["total"] == pytest.approx(n_params, rel=0.04)


@pytest.mark.parametrize("name", ["tiny", "cpu-small", "gpt2"])
def test_parameter_count_matches_the_real_model(name):
    assert count_parameters(preset(name).model)["total"] == GPT(preset(name).model).num_parameters()


def test_model_info_cli_json_for_175b_without_allocating():
    proc = run_cli("model-info", "gpt3-175b", "--json", check=True)
    info = json.loads(proc.stdout)
    assert 174e9 < info["parameters"] < 176e9
    assert info["flops_per_token_train"] == 3 * info["flops_per_token_forward"]
    assert info["flops_per_token_forward"] > 2 * info["parameters"] * 0.99
    assert info["kv_cache_bytes_per_token"]["bf16"] == 2 * 96 * 12288 * 2
    # the paged cache keeps all 2048 positions in the 48 banded layers too
    assert info["kv_cache_bytes_full_context"]["bf16"] == 2 * 12288 * 2 * 96 * 2048
    assert info["learning_rate"] == 0.6e-4 and info["batch_tokens"] == 3_200_000
    human = run_cli("model-info", "gpt3-small", check=True).stdout
    assert "125.2M parameters" in human and "KV cache" in human


def test_nvidia_style_json_config_loads(tmp_path):
    config = {"n_embd": 128, "n_layer": 3, "n_head": 4, "embd_pdrop": 0.1, "attn_pdrop": 0.05, "resid_pdrop": 0.2,
              "afn": "gelu", "clf_pdrop": 0.1, "learning_rate": 2.5e-4, "lr_decay": True, "lr_decay_steps": 500,
              "max_epochs": 2, "train_dataset": "data/train", "eval_dataset": "data/val", "batch_size": 8,
              "eval_batch_size": 4, "optimizer": "adam"}
    path = tmp_path / "gpt3.json"
    path.write_text(json.dumps(config))
    cfg = build_train_config(path)
    m = cfg.model_config()
    assert (m.n_embd, m.n_layer, m.n_head, m.attn_pdrop, m.resid_pdrop, m.activation) == (128, 3, 4, 0.05, 0.2, "gelu")
    assert (m.embd_pdrop, m.clf_pdrop) == (0.1, 0.1)
    assert (cfg.learning_rate, cfg.lr_decay, cfg.lr_decay_steps, cfg.max_epochs) == (2.5e-4, "cosine", 500, 2.0)
    assert (cfg.data, cfg.eval_data, cfg.batch_size, cfg.eval_batch_size, cfg.optimizer) == \
        ("data/train", "data/val", 8, 4, "adam")
    assert cfg.planned_steps(steps_per_epoch=100.5) == 201   # max_epochs decides: max_steps was not given


def test_run_length_rule():
    """max_steps given wins; otherwise max_epochs; otherwise 1000 steps; under max_time alone, no cap."""
    def steps(**overrides):
        return build_train_config(None, {"data": "x", **overrides}).planned_steps(steps_per_epoch=10.2)
    assert steps() == 1000
    assert steps(max_epochs=2) == 21
    assert steps(max_steps=7, max_epochs=2) == 7
    assert steps(max_time=60) == 0 and steps(max_time=60, max_epochs=1) == 11


def test_adam_and_adamw_decay_differently():
    """adamw shrinks a weight by lr * wd * w on its own; adam adds wd * w to the gradient, which Adam's
    normalisation turns into a step of lr * sign(w)."""
    import torch
    from gptstack.train.optim import build_optimizer
    moved = {}
    for name in ("adamw", "adam"):
        cfg = build_train_config(None, {"data": "x", "optimizer": name, "learning_rate": 0.01, "weight_decay": 0.1})
        layer = torch.nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            layer.weight.copy_(torch.tensor([[1.0, -2.0], [0.5, 4.0]]))
        layer.weight.grad = torch.zeros(2, 2)   # no loss gradient: only weight decay moves the weights
        before = layer.weight.detach().clone()
        build_optimizer(layer, cfg, torch.device("cpu")).step()
        moved[name] = before - layer.weight.detach()
    torch.testing.assert_close(moved["adamw"], 0.01 * 0.1 * torch.tensor([[1.0, -2.0], [0.5, 4.0]]))
    torch.testing.assert_close(moved["adam"], 0.01 * torch.tensor([[1.0, -1.0], [1.0, 1.0]]), rtol=1e-5, atol=1e-7)


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: somewhere\npreset: tiny\nmodel:\n  n_layer: 3\nlearning_rate: 1e-3\n")
    cfg = build_train_config(path, {"model.n_head": "4", "batch_size": "7", "compile": "false", "n_embd": "32"})
    m = cfg.model_config()
    assert (m.n_layer, m.n_head, m.n_embd) == (3, 4, 32)
    assert cfg.batch_size == 7 and cfg.learning_rate == 1e-3 and cfg.compile is False


@pytest.mark.parametrize("overrides, message", [
    ({"batch_size": "zero"}, "batch_size must be of type int"),
    ({"learning_rate": "-1"}, "learning_rate must be > 0"),
    ({"bogus": "1"}, "unknown config key"),
    ({"model.n_head": "5", "model.n_embd": "64"}, "divisible by model.n_head"),
    ({"model.attention": "sparse"}, "model.attention must be one of"),
    ({"preset": "gpt5"}, "unknown preset"),
    ({"lr_decay": "exp"}, "lr_decay must be"),
    ({"afn": "relu"}, "afn/activation"),
])
def test_bad_config_values_are_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        build_train_config(None, {"data": "x", **overrides})


def test_preset_learning_rate_is_the_default():
    assert build_train_config(None, {"data": "x", "preset": "gpt3-xl"}).peak_learning_rate == 2.0e-4
    assert build_train_config(None, {"data": "x", "preset": "gpt2"}).peak_learning_rate == 6e-4
    assert build_train_config(None, {"data": "x", "preset": "gpt3-xl", "learning_rate": "1e-3"}).peak_learning_rate == 1e-3


def test_every_preset_is_valid():
    for name, p in PRESETS.items():
        assert p.model.validate() is p.model, name
        assert model_info(p.model)["parameters"] > 0

"""`gptstack plan`: its arithmetic against published figures, and its command line."""

import json

import pytest

from gptstack.config import count_parameters, model_info, preset
from gptstack.train.plan import Layout, PlanConfig, memory_bytes, memory_per_device, parameters_per_device, plan

from conftest import run_cli

GPT3 = preset("gpt3-175b").model


def test_one_device_holds_every_parameter_at_16_bytes():
    """ZeRO (Rajbhandari et al. 2020): mixed-precision Adam keeps 2 + 2 + 12 = 16 bytes per parameter."""
    whole = Layout(dp=1, tp=1, pp=1, fsdp=False)
    assert parameters_per_device(GPT3, whole) == count_parameters(GPT3)["total"]
    memory = memory_per_device(GPT3, whole, micro_batch=1, checkpointing=True)
    assert memory["model_states"] == 16 * count_parameters(GPT3)["total"]


def test_sharding_divides_the_model_states():
    n = count_parameters(GPT3)["total"]
    fsdp = memory_per_device(GPT3, Layout(dp=64, tp=1, pp=1, fsdp=True), 1, True)["model_states"]
    block = 12 * GPT3.n_embd ** 2 + 13 * GPT3.n_embd
    assert fsdp == pytest.approx(16 * n / 64 + 3 * 2 * block)   # ZeRO-3 share + one gathered block, prefetch, grads
    tp8 = parameters_per_device(GPT3, Layout(dp=1, tp=8, pp=1, fsdp=False))
    pp8 = parameters_per_device(GPT3, Layout(dp=1, tp=1, pp=8, fsdp=False))
    embeddings = (GPT3.vocab_size + GPT3.block_size) * GPT3.n_embd
    assert tp8 == pytest.approx((n - embeddings) / 8 + embeddings, rel=0.01)   # the blocks split, embeddings whole
    assert pp8 == pytest.approx(n / 8 + GPT3.vocab_size * GPT3.n_embd, rel=0.01)   # first stage: 12 blocks + embeddings


def test_full_recomputation_keeps_2sbh_per_layer():
    """Korthikanti et al. 2022: with full activation recomputation a layer stores its input, 2*s*b*h bytes."""
    s, b, h, L = GPT3.block_size, 1, GPT3.n_embd, GPT3.n_layer
    acts = memory_per_device(GPT3, Layout(dp=1, tp=8, pp=1, fsdp=False), b, checkpointing=True)["activations"]
    assert acts == 2 * s * b * h * L + s * b * h * (10 + 24 / 8)
    no_ckpt = memory_per_device(GPT3, Layout(dp=1, tp=8, pp=1, fsdp=False), b, checkpointing=False)["activations"]
    assert no_ckpt == s * b * h * (10 + 24 / 8) * L


def test_training_time_matches_megatron_lm():
    """Narayanan et al. 2021: GPT-3 175B on 1024 A100s at 140 TFLOP/s each (with recomputation) takes
    about 34 days for 300B tokens, from 8 * T * P / (n * X); our FLOP count also has attention and the
    head, about 3% more."""
    result = plan(PlanConfig(gpus=1024, gpu_tflops=312, mfu=140 / 312, tokens=300e9))
    assert result["days"] == pytest.approx(34, rel=0.05)
    no_recompute = plan(PlanConfig(gpus=1024, activation_checkpointing=False))
    assert no_recompute["flops_per_token"] == pytest.approx(6 * count_parameters(GPT3)["total"], rel=0.05)   # 6N
    assert no_recompute["flops_per_token"] == model_info(GPT3)["flops_per_token_train"]


def test_smallest_fitting_layout_comes_first():
    result = plan(PlanConfig(gpus=1024, gpu_memory="80GB", fsdp=False))
    first = result["layouts"][0]
    assert first["fits"] and first["total"] <= 80e9
    smaller = [r for r in result["layouts"] if r["layout"].tp * r["layout"].pp < first["layout"].tp * first["layout"].pp]
    assert all(not r["fits"] for r in smaller)
    assert plan(PlanConfig(gpus=8, gpu_memory="80GB", tp=8, pp=1))["layouts"][0]["fits"] is False   # 175B on 8 GPUs


def test_memory_sizes_parse():
    assert memory_bytes("80GB") == 80e9 and memory_bytes("24GiB") == 24 * 2 ** 30 and memory_bytes("512 MB") == 512e6


def test_plan_cli_prints_a_layout_that_fits_and_explains_bad_input():
    proc = run_cli("plan", "gpt3-175b", "--gpus", "1024", "--gpu-memory", "80GB", check=True)
    assert "smallest layout that fits: dp " in proc.stdout and "16 bytes/parameter" in proc.stdout
    assert "days" in proc.stdout
    data = json.loads(run_cli("plan", "gpt3-175b", "--gpus", "1024", "--tp", "8", "--pp", "8", "--json",
                              check=True).stdout)
    assert [r["layout"] for r in data["layouts"]] == [{"dp": 16, "tp": 8, "pp": 8, "fsdp": True}]   # dp over tp x pp is FSDP
    bad = run_cli("plan", "gpt3-175b", "--gpu-memory", "lots")
    assert bad.returncode == 2 and "is not a size like 80GB" in bad.stderr and "Traceback" not in bad.stderr
    bad = run_cli("plan", "gpt3-175b", "--tp", "3", "--pp", "1")
    assert bad.returncode == 2 and "tp must divide n_head" in bad.stderr

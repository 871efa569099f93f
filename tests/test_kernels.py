"""The decode kernels (csrc/) against the PyTorch oracle, on every instruction set this CPU runs."""

import math
import os
import platform
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from gptstack import ops
from gptstack.checkpoint import load_model
from gptstack.inference import kernels
from gptstack.inference.kernels import FORMATS, DecodeLinear, calibrate, pack, quantize_weight, unpack
from gptstack.inference.quantize import prepare_weights

from conftest import runnable_isas

ROWS = (1, 2, 3, 5, 8, 16, 17, 64)
# (out, in): in not a multiple of 64 (nor of 32), out not a multiple of a panel or a tile, K = 3072
SHAPES = ((17, 40), (100, 70), (64, 32), (130, 3072), (2304, 768))
# How far fp32 sums in another order may move an output, relative to sum |x| |w| (measured: < 3e-7
# on every copy; one int8 code off in one weight moves it by ~1e-5, see test_a_wrong_kernel_would_fail)
SUM_ORDER = 2e-6


def cpu_flags() -> set[str]:
    try:
        return {f for line in open("/proc/cpuinfo") if line.startswith("flags") for f in line.split(":")[1].split()}
    except OSError:
        return set()


def oracle(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """F.linear in float64 on the dequantized weight, and sum |x| |w| + |bias| per output, which bounds
    how far summing in another order (or rounding x or the result) may move each output."""
    weight = weight.double()
    expected = F.linear(x.double(), weight, None if bias is None else bias.double())
    return expected, F.linear(x.double().abs(), weight.abs(), None if bias is None else bias.double().abs())


@pytest.mark.parametrize("fmt", FORMATS)
def test_kernel_matches_the_oracle_for_every_isa_rows_and_odd_shapes(fmt, each_isa):
    torch.manual_seed(0)
    for out, k in SHAPES:
        linear = torch.nn.Linear(k, out, bias=out != 64)
        layer = DecodeLinear(linear, fmt)
        weight = quantize_weight(linear.weight, fmt).dequantize()
        assert layer.packed
        for isa in runnable_isas():
            each_isa(isa)
            for rows in ROWS:
                for x_dtype in (torch.float32, torch.bfloat16):
                    x = torch.randn(rows, k).to(x_dtype)
                    got = layer.run("kernel", x)
                    assert got.dtype == x_dtype and got.shape == (rows, out)
                    expected, magnitude = oracle(x.float(), weight, linear.bias)
                    # rounding to bf16 moves a value by up to 2^-8 of it: vdpbf16ps rounds x, and a
                    # bf16 result is rounded too
                    rounded = (fmt == "bf16" and isa == "avx512_bf16") or x_dtype == torch.bfloat16
                    relative = SUM_ORDER + (2.0 ** -8 if rounded else 0)
                    error = (got.double() - expected).abs()
                    bound = relative * magnitude + 1e-6
                    if fmt == "int8" and kernels.int8_rounds_activations():
                        bound += int8_activation_rounding(x.float(), weight)
                    assert (error <= bound).all(), (fmt, isa, out, k, rows, x_dtype, (error / bound).max().item())


def int8_activation_rounding(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """How far rounding x to int8 per group of 32 k (by at most half a step, max |x| / 127 / 2, of its
    group) may move each output: sum |w| times that half step."""
    rows, k = x.shape
    groups = -(-k // kernels.GROUP_K)
    top = F.pad(x.abs(), (0, groups * kernels.GROUP_K - k)).view(rows, groups, kernels.GROUP_K).amax(dim=2)
    half_step = top.repeat_interleave(kernels.GROUP_K, dim=1)[:, :k].double() / 127 / 2
    return F.linear(half_step, weight.double().abs())


def test_a_wrong_kernel_would_fail():
    """The oracle's bounds are tight enough to catch a mistake as small as one weight off by one code."""
    torch.manual_seed(0)
    codes = quantize_weight(torch.randn(64, 768), "int8")
    x = torch.randn(1, 768)
    expected, magnitude = oracle(x, codes.dequantize(), None)
    codes.values[5, 100] += 1
    wrong = F.linear(x, codes.dequantize()).double()
    assert ((wrong - expected).abs() > SUM_ORDER * magnitude + 1e-6).any()


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quantize_dequantize_round_trip_and_packing(fmt):
    torch.manual_seed(0)
    weight = torch.randn(100, 70)
    weight[3] = 0                                   # an all-zero row (scale 0) quantizes to zeros
    quantized = quantize_weight(weight, fmt)
    restored = quantized.dequantize()
    error = (restored - weight).abs()
    if fmt == "int8":
        assert (error <= quantized.scales[:, None] / 2 + 1e-6).all()      # rounding: half a step
    else:
        step = quantized.scales.repeat_interleave(kernels.GROUP_K, dim=1)[:, :70].abs()
        assert quantized.values.min() >= -8 and quantized.values.max() <= 7
        assert (quantized.values == -8).any()      # q4_0: the largest magnitude of a group maps to -8
        # half a step, except the opposite extreme of a group (+8 steps), clamped to 7: one step
        assert (error <= step + 1e-6).all() and (error <= step / 2 + 1e-6).float().mean() > 0.97
    assert (restored[3] == 0).all()
    panels, scales = pack(quantized)
    unpacked = unpack(fmt, panels, scales, 100, 70)
    assert torch.equal(unpacked.values, quantized.values) and torch.equal(unpacked.scales, quantized.scales)


@pytest.mark.parametrize("fmt", ["fp32", "bf16"])
def test_packing_float_formats_is_lossless(fmt):
    weight = torch.randn(130, 100)
    quantized = quantize_weight(weight, fmt)
    panels, _ = pack(quantized)
    assert torch.equal(unpack(fmt, panels, None, 130, 100).values, quantized.values)


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_path_and_the_fallback_without_kernels_agree(fmt, monkeypatch):
    """Each path a layer may be planned onto, and the layer built where the kernels are missing,
    compute the same product (bf16 paths to bf16 precision); forward takes [B, T, in]."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 80)
    x = torch.randn(2, 3, 96)
    expected = F.linear(x, quantize_weight(linear.weight, fmt).dequantize(), linear.bias)
    layers = [DecodeLinear(linear, fmt)]
    int8_kernel_rounds_x = kernels.int8_rounds_activations()
    monkeypatch.setattr(kernels, "_ops", None)
    layers.append(DecodeLinear(linear, fmt))
    assert not layers[-1].packed and layers[-1].weight.shape == (80, 96)
    for layer in layers:
        assert layer(x).shape == (2, 3, 80)
        for path in layer.candidate_paths():
            rounded = "bf16" in path or fmt == "bf16" or path == "int8pack" or (
                fmt == "int8" and path == "kernel" and int8_kernel_rounds_x)    # x to bf16, or to int8 per 32
            tolerance = 3e-2 if rounded else 1e-4
            torch.testing.assert_close(layer.run(path, x.view(6, 96)), expected.view(6, 80), rtol=tolerance,
                                       atol=tolerance * expected.abs().max().item(), msg=f"{fmt} {path}")


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 only")
def test_the_extension_is_built_and_used_on_x86():
    flags = cpu_flags()
    if "avx2" not in flags:
        pytest.skip("a CPU without AVX2 runs the generic copy")
    assert kernels.available(), "gptstack._kernels did not build or load: pip install --no-build-isolation -e ."
    assert kernels.isa() != "generic"
    if "avx512f" in flags:
        assert kernels.isa() == ("avx512_bf16" if "avx512_bf16" in flags else "avx512")
    layer = DecodeLinear(torch.nn.Linear(64, 64), "int8")
    assert layer.packed and layer.path_for(1) == "kernel"


def test_the_environment_variable_caps_the_isa():
    if not kernels.available():
        pytest.skip("the kernels are not built")
    code = "from gptstack.inference import kernels; print(kernels.isa())"
    env = {**os.environ, "GPTSTACK_KERNEL_ISA": "generic"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "generic"


def test_calibrate_plans_a_path_per_batch_size():
    torch.manual_seed(0)
    layers = [DecodeLinear(torch.nn.Linear(256, 512), "int8") for _ in range(3)]
    report = calibrate(layers, sizes=(1, 32))
    assert len(report.shapes) == 1 and report.shapes[0].count == 3          # one shape, timed once
    plan = layers[0].plan
    assert all(layer.plan == plan for layer in layers) and plan[-1][0] == math.inf
    seconds = report.shapes[0].seconds
    assert set(seconds) == set(layers[0].candidate_paths())
    for rows in (1, 32):                                                     # the fastest at each size
        assert seconds[layers[0].path_for(rows)][rows] == min(times[rows] for times in seconds.values())
    assert report.tokens_per_second(1) > 0 and "512x256 (x3)" in str(report)


def greedy(model, prompt: list[int], steps: int) -> list[int]:
    sequence = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            sequence.append(int(model(torch.tensor([sequence]))[0][0, -1].argmax()))
    return sequence


@pytest.mark.parametrize("fmt,cosine,agreement", [("fp32", 0.99999, 1.0), ("bf16", 0.999, 0.9),
                                                  ("int8", 0.999, 0.9), ("int4", 0.99, 0.8)])
def test_a_prepared_model_decodes_close_to_fp32(tiny_checkpoint, fmt, cosine, agreement):
    """Greedy decoding of the tiny checkpoint: along the fp32 model's tokens, the prepared model's
    logits stay close (cosine per position) and mostly pick the same next token."""
    reference, tokenizer, _ = load_model(tiny_checkpoint)
    prepared = prepare_weights(load_model(tiny_checkpoint)[0], fmt, calibrate_paths=False)
    assert isinstance(prepared.lm_head, DecodeLinear) and prepared.lm_head.format == fmt
    sequence = greedy(reference, tokenizer.encode("ROMEO:\nWhat light"), 24)
    with torch.no_grad():
        expected = reference(torch.tensor([sequence]))[0][0]
        got = prepared(torch.tensor([sequence]))[0][0]
    assert F.cosine_similarity(got, expected, dim=-1).min() > cosine
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= agreement


def attention_case(sequences: int, head_dim: int, dtype: torch.dtype, seed: int):
    """A pool of 600 slots of 12 heads, each sequence's keys in slots scattered over it (a random
    permutation), key lengths from 1 to 300 that differ between sequences."""
    generator = torch.Generator().manual_seed(seed)
    pool = [torch.randn(600, 12, head_dim, generator=generator).to(dtype) for _ in range(2)]
    q = torch.randn(12, sequences, head_dim, generator=generator).to(dtype).transpose(0, 1)   # not contiguous
    key_slots = torch.stack([torch.randperm(600, generator=generator)[:300] for _ in range(sequences)])
    lengths = torch.tensor([1, 300, 77][:sequences] + torch.randint(1, 301, (max(0, sequences - 3),),
                                                                    generator=generator).tolist())
    return q, *pool, key_slots, lengths


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_decode_attention_matches_the_oracle_for_every_isa(dtype, each_isa):
    """The op against the PyTorch fallback in float64 (the same bf16 inputs, widened), dense and
    banded (a band shorter than some sequences, longer than others)."""
    for sequences, head_dim in ((1, 64), (3, 64), (16, 64), (3, 40)):
        q, k_pool, v_pool, key_slots, lengths = attention_case(sequences, head_dim, dtype, seed=sequences + head_dim)
        scale = head_dim ** -0.5
        for band_width in (0, 50):
            wide = [t.double() for t in (q, k_pool, v_pool)]
            expected = ops.paged_decode_attention(*wide, key_slots, lengths, band_width, scale)
            # sum p |v| bounds how far fp32 sums in another order may move an output
            magnitude = ops.paged_decode_attention(*wide[:2], wide[2].abs(), key_slots, lengths, band_width, scale)
            for isa in runnable_isas():
                each_isa(isa)
                got = kernels.paged_decode_attention(q, k_pool, v_pool, key_slots, lengths, band_width, scale)
                assert got.dtype == dtype and got.shape == q.shape
                error = (got.double() - expected).abs()
                # measured: < 5e-7 of the magnitude on every copy; a bf16 result is also rounded (2^-8)
                bound = 1e-5 * magnitude + (2.0 ** -8 * expected.abs() if dtype == torch.bfloat16 else 0)
                assert (error <= bound).all(), (isa, sequences, head_dim, band_width, (error / bound).max().item())


def test_paged_decode_attention_checks_what_it_would_read():
    if not kernels.available():
        pytest.skip("the kernels are not built")
    q, k_pool, v_pool, key_slots, lengths = attention_case(3, 64, torch.float32, seed=0)
    key_slots[1, 299] = 600                                  # a visible key outside the pool
    with pytest.raises(RuntimeError, match="not a pool slot"):
        ops.library.paged_decode_attention(q, k_pool, v_pool, key_slots, lengths, 0, 0.125)
    key_slots[1, 299] = 0
    with pytest.raises(RuntimeError, match="key_lengths"):
        ops.library.paged_decode_attention(q, k_pool, v_pool, key_slots, lengths + 1, 0, 0.125)
    key_slots[0, 1] = -5                                     # beyond the sequence's length: never read
    ops.library.paged_decode_attention(q, k_pool, v_pool, key_slots, lengths, 0, 0.125)

import asyncio
import dataclasses
import math
import threading
import time

import pytest
import torch

from gptstack.checkpoint import load_model
from gptstack.config import preset
from gptstack.data.loader import TokenDataset, eval_batches
from gptstack.inference.engine import Engine, EngineConfig, QueueFull
from gptstack.inference.fused import FusedQKVAttention, fuse_qkv
from gptstack.inference.kernels import DecodeLinear
from gptstack.inference.quantize import quantize_int8
from gptstack.inference.sampling import SamplingParams, apply_penalties
from gptstack.lora import LoRAConfig, LoRALinear, add_lora
from gptstack.model import GPT
from gptstack.tokenizer import load_tokenizer


@pytest.fixture()
def engine(tiny_checkpoint):
    model, tok, _ = load_model(tiny_checkpoint)
    with Engine(model, tok, EngineConfig(max_batch_size=4, max_queue=4, step_tokens=8, block_size=4)) as e:
        yield e


def test_batch_results_equal_one_at_a_time(engine):
    params = SamplingParams(max_new_tokens=12, temperature=0.9, seed=7, ignore_eos=True)
    prompts = ["ROMEO:", "First Citizen:\nBefore we proceed any further", "KING", "O"]
    together = engine.generate(prompts, params)
    alone = [engine.generate([p], params)[0] for p in prompts]
    assert [c.text for c in together] == [c.text for c in alone]
    assert all(len(c.token_ids) == 12 and c.finish_reason == "length" for c in together)


def test_greedy_engine_matches_plain_forward(engine):
    ids = engine.tokenizer.encode("ROMEO:\nWhat says my love")   # longer than one prefill chunk of 8
    got = engine.generate([ids], SamplingParams(max_new_tokens=10, temperature=0, ignore_eos=True))[0].token_ids
    seq = list(ids)
    with torch.no_grad():
        for _ in range(10):
            seq.append(int(engine.model(torch.tensor([seq]))[0][0, -1].argmax()))
    assert got == seq[len(ids):]


def test_stop_strings_and_logprobs(engine):
    params = SamplingParams(max_new_tokens=40, temperature=0, ignore_eos=True, logprobs=3)
    full = engine.generate(["ROMEO:"], params)[0]
    stop = full.text[5:8]
    cut = engine.generate(["ROMEO:"], SamplingParams(max_new_tokens=40, temperature=0, ignore_eos=True, stop=[stop]))[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[:full.text.index(stop)]
    assert len(full.logprobs) == 40 and all(lp <= 0 for lp in full.logprobs)


def test_cancel_frees_the_slot_and_queue_is_bounded(tiny_checkpoint):
    model, tok, _ = load_model(tiny_checkpoint)
    engine = Engine(model, tok, EngineConfig(max_batch_size=1, max_queue=2)).start()
    try:
        long = SamplingParams(max_new_tokens=60, ignore_eos=True)
        first = engine.submit([1, 2, 3], long)
        while engine.batch_size == 0:   # wait until it holds the only slot
            time.sleep(0.001)
        waiting = [engine.submit([1, 2, 3], long) for _ in range(2)]
        with pytest.raises(QueueFull):
            engine.submit([1, 2, 3], long)
        first.cancel()
        for h in waiting:
            h.cancel()
        events = list(first)
        assert events[-1].finish_reason == "cancelled"
        assert all(list(h)[-1].finish_reason == "cancelled" for h in waiting)
        done = engine.submit([1, 2, 3], SamplingParams(max_new_tokens=3, ignore_eos=True))
        assert list(done)[-1].finish_reason == "length"
        assert engine.batch_size == 0 and engine.queue_depth == 0 and engine.stats["cancelled"] == 3
    finally:
        engine.shutdown()


def test_async_stream_text_equals_decoded_tokens(engine):
    async def run():
        handle = engine.submit(engine.tokenizer.encode("KING:"), SamplingParams(max_new_tokens=20, seed=3, ignore_eos=True))
        return [e async for e in handle]

    events = asyncio.run(run())
    assert events[-1].finish_reason == "length" and events[-1].completion_tokens == 20
    ids = [e.token_id for e in events]
    assert "".join(e.text for e in events) == engine.tokenizer.decode(ids)


def test_requests_that_cannot_fit_are_refused(engine):
    with pytest.raises(ValueError, match="more than the context"):
        engine.submit([1] * 250, SamplingParams(max_new_tokens=10))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.submit([10**6], SamplingParams(max_new_tokens=1))
    with pytest.raises(ValueError, match="top_p"):
        engine.submit([1], SamplingParams(top_p=0))
    with pytest.raises(ValueError, match="logit_bias token ids"):
        engine.submit([1], SamplingParams(logit_bias={10**6: 1.0}))
    with pytest.raises(ValueError, match="logit_bias values"):
        engine.submit([1], SamplingParams(logit_bias={5: 101.0}))


def greedy_with_context_shift(model, prompt: list[int], n: int, window: int) -> tuple[list[int], int]:
    """Greedy tokens recomputed from scratch on what a context shift keeps (whenever the context
    outgrows the window, only its newest half), and how many shifts that took."""
    ids, start, shifts = list(prompt), 0, 0
    with torch.no_grad():
        for _ in range(n):
            if len(ids) - start > window:
                start, shifts = len(ids) - window // 2, shifts + 1
            ids.append(int(model(torch.tensor([ids[start:]]))[0][0, -1].argmax()))
    return ids[len(prompt):], shifts


def test_context_shift_keeps_the_newest_half_and_goes_on(tiny_checkpoint):
    model, tok, _ = load_model(tiny_checkpoint)
    engine = Engine(model, tok, EngineConfig(max_batch_size=2, max_seq_len=32, step_tokens=8, block_size=4,
                                             context_shift=True))
    short = tok.encode("ROMEO:")
    long = tok.encode("First Citizen:\nBefore we proceed any further, hear me speak.\nAll:\nSpeak, speak. You are "
                      "all resolved rather to die than to famish?")
    assert len(long) > 32
    params = SamplingParams(max_new_tokens=70, temperature=0, ignore_eos=True)
    together = engine.generate([short, long], params)      # in one batch, shifting at different steps
    shifts = 0
    for prompt, completion in zip((short, long), together):
        expected, shifted = greedy_with_context_shift(model, prompt, 70, 32)
        assert completion.token_ids == expected and shifted >= 3
        assert completion.finish_reason == "length" and completion.text == tok.decode(completion.token_ids)
        shifts += shifted
    assert engine.stats["context_shifts"] == shifts


def test_banded_model_decodes_from_the_paged_cache_as_without_a_cache():
    """A GPT-3-style model (every other layer banded) in a pool of two contexts' blocks: prompts and
    outputs several bands long, chunks longer than the band, three requests sharing the pool and
    rows at different positions give the tokens of recomputing every step."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(preset("tiny").model, attention="alternating_banded", band_width=4, n_layer=4)
    model, tok = GPT(cfg).eval(), load_tokenizer("gpt2")
    block_bytes = 2 * 4 * cfg.n_embd * 4 * 8      # k and v, 4 layers, fp32, 8 positions
    engine = Engine(model, tok, EngineConfig(max_batch_size=8, max_seq_len=48, step_tokens=16, block_size=8,
                                             kv_cache_memory=2 * 6 * block_bytes))
    assert engine.kv_cache_bytes == 12 * block_bytes
    with pytest.raises(ValueError, match="less than one context"):
        Engine(model, tok, EngineConfig(max_seq_len=48, block_size=8, kv_cache_memory=5 * block_bytes))
    prompts = [[(7 * i + 3 * j) % 1000 for j in range(n)] for i, n in enumerate((3, 13, 9))]
    completions = engine.generate(prompts, SamplingParams(max_new_tokens=20, temperature=0, ignore_eos=True))
    for prompt, completion in zip(prompts, completions):
        assert completion.token_ids == greedy_with_context_shift(model, prompt, 20, window=48)[0]


def test_prefix_cache_prefills_a_shared_prompt_once(tiny_checkpoint):
    """Requests sharing a long system prompt: the later ones take its cached blocks (all its full
    blocks), compute only their own tail, and sample exactly what an engine without the cache does."""
    model, tok, _ = load_model(tiny_checkpoint)
    system = tok.encode("You are a helpful assistant who speaks like Shakespeare. " * 6)
    questions = [system + tok.encode(f"\nUSER: Tell me of {w}.\nASSISTANT:") for w in ("Rome", "love", "war")]
    params = SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True)
    config = dict(max_batch_size=2, step_tokens=64, block_size=8)
    cached = Engine(model, tok, EngineConfig(**config))
    uncached = Engine(model, tok, EngineConfig(**config, prefix_caching=False))
    first = cached.generate(questions[:1], params)
    computed_first = cached.stats["prompt_tokens"]
    rest = cached.generate(questions[1:], params)
    assert [c.token_ids for c in first + rest] == [c.token_ids for c in uncached.generate(questions, params)]
    shared_blocks = len(system) // 8
    assert cached.stats["prefix_cache_hit_tokens"] >= 2 * shared_blocks * 8
    assert cached.stats["prompt_tokens"] - computed_first <= sum(len(q) for q in questions[1:]) - 2 * shared_blocks * 8
    assert uncached.stats["prefix_cache_hit_tokens"] == 0


def test_a_full_pool_preempts_and_every_request_still_gets_its_tokens(tiny_checkpoint):
    """Three long generations in a pool of one context and a half: the newest running request is
    preempted, readmitted later, and every output equals the request's output run alone."""
    model, tok, _ = load_model(tiny_checkpoint)
    block_bytes = 2 * model.config.n_layer * 8 * model.config.n_embd * 4
    engine = Engine(model, tok, EngineConfig(max_batch_size=3, max_seq_len=64, step_tokens=16, block_size=8,
                                             kv_cache_memory=12 * block_bytes))
    prompts = ["ROMEO:", "JULIET:\nO Romeo", "KING RICHARD III:\nNow is the winter"]
    params = SamplingParams(max_new_tokens=40, temperature=0.8, seed=3, ignore_eos=True, frequency_penalty=0.5)
    together = engine.generate(prompts, params)
    assert engine.stats["preempted"] > 0
    alone = Engine(model, tok, EngineConfig(max_batch_size=1, block_size=8))
    assert [c.token_ids for c in together] == [alone.generate([p], params)[0].token_ids for p in prompts]


def test_admission_counts_the_blocks_promised_to_requests_admitted_before(tiny_checkpoint):
    """Three prompts of 7 blocks each and a pool of 10: one runs at a time instead of all three being
    admitted against the same free blocks and then preempting one another."""
    model, tok, _ = load_model(tiny_checkpoint)
    block_bytes = 2 * model.config.n_layer * 8 * model.config.n_embd * 4
    engine = Engine(model, tok, EngineConfig(max_batch_size=3, max_seq_len=64, step_tokens=64, block_size=8,
                                             kv_cache_memory=10 * block_bytes, prefix_caching=False))
    prompts = [[(11 * i + 5 * j) % 5000 for j in range(53)] for i in range(3)]
    params = SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True)
    together = engine.generate(prompts, params)
    assert engine.stats["preempted"] == 0
    assert [c.token_ids for c in together] == [engine.generate([p], params)[0].token_ids for p in prompts]


def test_a_short_prompt_does_not_wait_behind_a_long_one_nor_does_decoding(tiny_checkpoint):
    """Chunked prefill: while a long prompt is prefilled over many steps, a request already decoding
    gets a token every step, and a short prompt submitted after the long one finishes first."""
    model, tok, _ = load_model(tiny_checkpoint)
    engine = Engine(model, tok, EngineConfig(max_batch_size=4, step_tokens=16, block_size=8)).start()
    try:
        decoding = engine.submit(tok.encode("ROMEO:"), SamplingParams(max_new_tokens=200, ignore_eos=True))
        next(iter(decoding))
        long = engine.submit(tok.encode("First Citizen:\nBefore we proceed any further, hear me speak. " * 12),
                             SamplingParams(max_new_tokens=2, ignore_eos=True))
        short = engine.submit(tok.encode("KING:"), SamplingParams(max_new_tokens=3, ignore_eos=True))
        steps_before = engine.stats["steps"]
        assert [e.finish_reason for e in short][-1] == "length"
        assert not long.finished and not long.drain()      # still prefilling its 200+ tokens
        list(long)
        tokens_meanwhile = len(decoding.drain())
        assert tokens_meanwhile >= engine.stats["steps"] - steps_before - 2
    finally:
        engine.shutdown()


def test_stream_yields_events_as_they_come_and_frees_the_slot_when_dropped(tiny_checkpoint, engine):
    model, tok, _ = load_model(tiny_checkpoint)
    inline = Engine(model, tok, EngineConfig(max_batch_size=1))
    params = SamplingParams(max_new_tokens=30, seed=2, ignore_eos=True)
    expected = inline.generate(["ROMEO:"], params)[0].text
    stream = inline.stream("ROMEO:", params)
    first = next(stream)
    assert first.finish_reason is None and inline.batch_size == 1    # the rest is not computed yet
    stream.close()
    assert "".join(e.text for e in inline.stream("ROMEO:", params)) == expected
    assert inline.batch_size == 0 and inline.stats["cancelled"] == 1
    assert "".join(e.text for e in engine.stream("ROMEO:", params)) == expected   # on a running loop too


def test_penalties_follow_openai_and_ctrl_rules():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    counts = torch.tensor([[2.0, 1.0, 0.0, 0.0]])
    seen = torch.tensor([[True, True, False, True]])
    out = apply_penalties(logits, counts, seen, torch.tensor([0.5]), torch.tensor([0.25]), torch.tensor([2.0]))
    # token 0: 2/2 - 0.25*2 - 0.5 = 0; token 1: -2*2 - 0.25 - 0.5 = -4.75; token 2 untouched; token 3: 0.5/2
    assert out.tolist() == [[0.0, -4.75, 1.0, 0.25]]


def test_penalties_change_what_the_engine_generates(engine):
    """Greedy text from a small model repeats itself; penalties in a mixed batch cut the repeats
    of the penalised request only."""
    plain = SamplingParams(max_new_tokens=40, temperature=0, ignore_eos=True)
    penalised = SamplingParams(max_new_tokens=40, temperature=0, ignore_eos=True, frequency_penalty=2.0,
                               presence_penalty=1.0, repetition_penalty=1.5)
    alone = engine.generate(["ROMEO:"], plain)[0]
    with_penalty, beside = [], []
    for i in range(2):   # the same two requests, each in a batch with the other
        handles = [engine.submit(engine.tokenizer.encode("ROMEO:"), p) for p in (penalised, plain)]
        with_penalty.append([e.token_id for e in handles[0] if e.token_id is not None])
        beside.append([e.token_id for e in handles[1] if e.token_id is not None])
    assert len(set(with_penalty[0])) > len(set(alone.token_ids))
    assert beside[0] == alone.token_ids and with_penalty[0] == with_penalty[1]


def perplexity(model, dataset) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for x, y in eval_batches(dataset, model.config.block_size, 4, 4):
            logits, _ = model(x)
            total += torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)).float(), y.reshape(-1),
                                                       reduction="sum").item()
            count += y.numel()
    return math.exp(total / count)


def test_int8_quantization_keeps_perplexity_within_two_percent(tiny_checkpoint, shakespeare):
    val = TokenDataset(shakespeare, "val")
    model, _, _ = load_model(tiny_checkpoint)
    reference = perplexity(model, val)
    quantized = quantize_int8(load_model(tiny_checkpoint)[0])
    layer = quantized.transformer.h[0].attn.qkv_proj     # q, k and v quantized as one fused matmul
    assert isinstance(layer, DecodeLinear) and layer.weight.dtype == torch.int8
    assert isinstance(quantized.lm_head, DecodeLinear) and quantized.lm_head.weight.dtype == torch.int8
    assert abs(perplexity(quantized, val) / reference - 1) < 0.02


def test_engine_fuses_q_k_v_into_one_matmul_with_the_same_logits(tiny_checkpoint):
    model, tok, _ = load_model(tiny_checkpoint)
    idx = torch.randint(0, model.config.vocab_size, (2, 20))
    with torch.no_grad():
        expected = model(idx)[0]
    engine = Engine(model, tok)
    attn = engine.model.transformer.h[0].attn
    assert isinstance(attn, FusedQKVAttention) and not hasattr(attn, "q_proj")
    assert attn.qkv_proj.weight.shape == (3 * model.config.n_embd, model.config.n_embd)
    with torch.no_grad():
        torch.testing.assert_close(engine.model(idx)[0], expected, rtol=0, atol=1e-5)
    # adapters kept apart are not plain projections: they stay as they are
    adapted = add_lora(load_model(tiny_checkpoint)[0], LoRAConfig(rank=2))
    assert isinstance(fuse_qkv(adapted).transformer.h[0].attn.q_proj, LoRALinear)


def test_weight_only_int8_linear_is_close():
    """Each path of the int8 layer on its own (CUDA takes "torch"): per-channel int8 weights, float activations."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32)
    x = torch.randn(5, 64)
    q = DecodeLinear(linear, "int8")
    assert q.weight.dtype == torch.int8
    for path in q.candidate_paths():
        assert torch.allclose(q.run(path, x), linear(x), atol=0.02 * linear(x).abs().max().item()), path


def test_call_runs_on_the_engine_thread_between_steps(engine):
    from gptstack.inference.engine import EngineStopped
    handle = engine.submit(engine.tokenizer.encode("ROMEO:"), SamplingParams(max_new_tokens=20, ignore_eos=True))
    future = engine.call(lambda: (threading.current_thread().name, torch.is_inference_mode_enabled()))
    assert future.result(timeout=30) == ("gptstack-engine", True)
    failing = engine.call(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        failing.result(timeout=30)
    events = list(handle)                         # generation went on around the calls
    assert events[-1].finish_reason == "length" and events[-1].completion_tokens == 20
    engine.shutdown()
    with pytest.raises(EngineStopped):
        engine.call(lambda: None)


def test_a_second_caller_during_an_inline_stream_is_refused(tiny_checkpoint):
    """stream() without a running loop drives the loop itself; a second caller meanwhile would wait forever."""
    model, tok, _ = load_model(tiny_checkpoint)
    engine = Engine(model, tok)
    first = engine.stream("ROMEO:", SamplingParams(max_new_tokens=5, seed=0))
    next(first)
    with pytest.raises(RuntimeError, match="unfinished stream"):
        next(engine.stream("JULIET:", SamplingParams(max_new_tokens=5, seed=0)))
    with pytest.raises(RuntimeError, match="unfinished stream"):
        engine.generate(["JULIET:"], SamplingParams(max_new_tokens=5))
    assert len(list(first)) >= 1
    assert engine.generate(["JULIET:"], SamplingParams(max_new_tokens=5, ignore_eos=True))[0].finish_reason == "length"


def test_a_failing_loop_ends_every_request_with_engine_stopped(tiny_checkpoint, monkeypatch):
    """A fault in a step (injected: the forward raises, as an out-of-memory would) must not leave
    requests waiting forever nor the engine looking alive to a health check."""
    from gptstack.inference.engine import EngineStopped
    model, tok, _ = load_model(tiny_checkpoint)
    engine = Engine(model, tok, EngineConfig(max_batch_size=1, max_queue=3))

    submitted = threading.Event()

    def out_of_memory(plan):
        submitted.wait(timeout=30)
        raise RuntimeError("injected: out of memory")
    monkeypatch.setattr(engine, "_forward", out_of_memory)
    params = SamplingParams(max_new_tokens=5, ignore_eos=True)
    engine.start()
    handles = [engine.submit([1, 2, 3], params) for _ in range(3)]    # one running, two waiting
    submitted.set()
    for handle in handles:
        with pytest.raises(EngineStopped, match="injected: out of memory"):
            list(handle)
    assert not engine.alive and "RuntimeError" in str(engine.failure)
    with pytest.raises(EngineStopped):
        engine.submit([1, 2, 3], params)
    engine.shutdown()

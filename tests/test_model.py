import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from gptstack.config import preset
from gptstack.loss import linear_cross_entropy
from gptstack.model import GPT, KVCache, QKV_PROJECTIONS, attention_mask

from test_checkpoint import fused_qkv_state


def tiny(**changes):
    return dataclasses.replace(preset("tiny").model, **changes)


@pytest.mark.parametrize("attention", ["dense", "alternating_banded"])
def test_kv_cache_decode_equals_full_forward(attention):
    torch.manual_seed(0)
    cfg = tiny(attention=attention, band_width=6, n_layer=4)
    model = GPT(cfg).eval()
    idx = torch.randint(0, cfg.vocab_size, (3, 30))
    full, _ = model(idx)
    cache = KVCache.allocate(cfg, 3)
    pieces = [model(idx[:, :11], cache=cache, positions=torch.arange(11).expand(3, 11))[0]]
    for t in range(11, 30):
        pieces.append(model(idx[:, t:t + 1], cache=cache, positions=torch.full((3, 1), t))[0])
    assert torch.allclose(torch.cat(pieces, 1), full, atol=1e-5)


def no_cache_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids[None])[0][0]


def test_banded_ring_cache_decodes_as_the_full_forward():
    """Banded layers keep only their band, as a ring. Rows at different positions, prefill chunks
    longer than the band and a reused slot all give the no-cache forward's logits (fp32, atol 1e-5)."""
    torch.manual_seed(0)
    cfg = tiny(attention="alternating_banded", band_width=5, n_layer=4)
    model = GPT(cfg).eval()
    cache = KVCache.allocate(cfg, 3)
    assert [k.shape[2] for k in cache.k] == [64, 5, 64, 5]
    seqs = [torch.randint(0, cfg.vocab_size, (n,)) for n in (40, 31, 23)]   # 4.6 to 8 bands long
    refs = [no_cache_logits(model, s) for s in seqs]
    prefill = [12, 3, 7]                   # slot i holds seqs[i][:prefill[i]]; 12 is over two bands
    with torch.no_grad():
        for slot, (s, n) in enumerate(zip(seqs, prefill)):
            logits, _ = model(s[None, :n], cache=cache.select([slot]), positions=torch.arange(n)[None])
            torch.testing.assert_close(logits[0], refs[slot][:n], rtol=0, atol=1e-5)
        # one decode batch with every row at its own position; rows in another order than slots
        order = [2, 0, 1]
        while any(prefill[i] < len(seqs[i]) for i in order):
            rows = [i for i in order if prefill[i] < len(seqs[i])]
            idx = torch.stack([seqs[i][prefill[i]:prefill[i] + 1] for i in rows])
            positions = torch.tensor([[prefill[i]] for i in rows])
            logits, _ = model(idx, cache=cache.select(rows), positions=positions)
            for row, i in enumerate(rows):
                torch.testing.assert_close(logits[row, 0], refs[i][prefill[i]], rtol=0, atol=1e-5)
                prefill[i] += 1
        # slot 0 reused by a shorter sequence, prefilled in two chunks (the second longer than the band)
        reuse = torch.randint(0, cfg.vocab_size, (17,))
        model(reuse[None, :4], cache=cache.select([0]), positions=torch.arange(4)[None])
        logits, _ = model(reuse[None, 4:], cache=cache.select([0]), positions=torch.arange(4, 17)[None])
    torch.testing.assert_close(logits[0], no_cache_logits(model, reuse)[4:], rtol=0, atol=1e-5)


def test_banded_layers_cache_only_their_band():
    dense, banded = tiny(n_layer=4), tiny(n_layer=4, attention="alternating_banded", band_width=8)
    per_position = 2 * banded.n_embd * 4       # keys and values, fp32
    assert KVCache.allocate(dense, 3).nbytes == 3 * per_position * 4 * 64
    assert KVCache.allocate(banded, 3).nbytes == 3 * per_position * (2 * 64 + 2 * 8)
    assert KVCache.slot_bytes(banded, 64, torch.float32) * 3 == KVCache.allocate(banded, 3).nbytes
    assert KVCache.allocate(banded, 2, max_len=6).nbytes == 2 * per_position * 4 * 6   # a band longer than the cache


def test_rows_at_different_positions_share_one_cache():
    """Continuous batching: each row of the cache advances on its own."""
    torch.manual_seed(0)
    cfg = tiny()
    model = GPT(cfg).eval()
    a, b = torch.randint(0, cfg.vocab_size, (1, 9)), torch.randint(0, cfg.vocab_size, (1, 4))
    ref_a, _ = model(a)
    ref_b, _ = model(b)
    cache = KVCache.allocate(cfg, 2)
    model(a[:, :8], cache=cache.select([0]), positions=torch.arange(8)[None])
    model(b[:, :3], cache=cache.select([1]), positions=torch.arange(3)[None])
    step, _ = model(torch.stack([a[0, 8:9], b[0, 3:4]]), cache=cache, positions=torch.tensor([[8], [3]]))
    assert torch.allclose(step[0, 0], ref_a[0, -1], atol=1e-5)
    assert torch.allclose(step[1, 0], ref_b[0, -1], atol=1e-5)
    # the same step with the rows in the other order reads the cache through a gather
    fresh = KVCache.allocate(cfg, 2)
    model(a[:, :8], cache=fresh.select([0]), positions=torch.arange(8)[None])
    model(b[:, :3], cache=fresh.select([1]), positions=torch.arange(3)[None])
    swapped, _ = model(torch.stack([b[0, 3:4], a[0, 8:9]]), cache=fresh.select([1, 0]), positions=torch.tensor([[3], [8]]))
    assert torch.allclose(swapped[0, 0], ref_b[0, -1], atol=1e-5) and torch.allclose(swapped[1, 0], ref_a[0, -1], atol=1e-5)


def test_causality_future_tokens_do_not_change_the_past():
    torch.manual_seed(0)
    model = GPT(tiny()).eval()
    idx = torch.randint(0, 50257, (1, 20))
    changed = idx.clone()
    changed[0, 15:] = 7
    assert torch.allclose(model(idx)[0][:, :15], model(changed)[0][:, :15], atol=1e-6)
    assert not torch.allclose(model(idx)[0][:, 15:], model(changed)[0][:, 15:])


@pytest.mark.parametrize("T, band", [(12, 4), (13, 4), (7, 3), (64, 16), (5, 8)])
def test_local_attention_is_dense_banded_attention(T, band):
    """Block-local attention computes what dense attention under the band mask computes, forward and
    backward: the same softmax over the same keys, summed in another order (fp32: ~1e-6 relative)."""
    from gptstack.model import local_attention
    torch.manual_seed(T)
    q, k, v = (torch.randn(2, 3, T, 8, requires_grad=True) for _ in range(3))
    mask = attention_mask(torch.arange(T)[None], T, band_width=band)
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    local = local_attention(q, k, v, band)   # band >= T: one padded block
    torch.testing.assert_close(local, dense, rtol=1e-5, atol=1e-6)
    grads_dense = torch.autograd.grad(dense.square().sum(), (q, k, v))
    grads_local = torch.autograd.grad(local.square().sum(), (q, k, v))
    for a, b in zip(grads_local, grads_dense):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_banded_layer_sees_only_its_window():
    mask = attention_mask(torch.arange(6)[None], 6, band_width=3)[0, 0]
    expected = torch.tensor([[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0],
                             [0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask, expected)
    torch.manual_seed(0)
    cfg = tiny(attention="alternating_banded", band_width=4)
    model = GPT(cfg).eval()
    assert [b.attn.band_width for b in model.transformer.h] == [None, 4]   # dense, banded, as in GPT-3
    attn = model.transformer.h[1].attn
    x = torch.randn(1, 12, cfg.n_embd)
    moved = x.clone()
    moved[0, :5] += 1.0                 # outside the window of positions >= 8
    y, y_moved = attn(x, None, None), attn(moved, None, None)
    assert torch.allclose(y[0, 8:], y_moved[0, 8:], atol=1e-6)
    assert not torch.allclose(y[0, 5:8], y_moved[0, 5:8])


def test_attention_runs_on_a_shard_of_its_heads():
    """Tensor parallelism gives each rank some heads' rows of q, k, v and the matching columns of
    c_proj; the ranks' outputs add up to the whole layer's (c_proj's bias on one rank only)."""
    torch.manual_seed(0)
    cfg = tiny(attention="alternating_banded", band_width=4)
    full = GPT(cfg).eval().transformer.h[1].attn
    x = torch.randn(2, 10, cfg.n_embd)
    width = cfg.n_embd // 2                    # two ranks, n_head / 2 heads each
    total = 0
    for rank in range(2):
        shard = copy.deepcopy(full)
        rows = slice(rank * width, (rank + 1) * width)
        for name in QKV_PROJECTIONS:
            part = getattr(full, name)
            setattr(shard, name, torch.nn.Linear(cfg.n_embd, width))
            getattr(shard, name).load_state_dict({"weight": part.weight[rows], "bias": part.bias[rows]})
        shard.c_proj = torch.nn.Linear(width, cfg.n_embd)
        shard.c_proj.load_state_dict({"weight": full.c_proj.weight[:, rows], "bias": full.c_proj.bias * (rank == 0)})
        with torch.no_grad():
            total = total + shard(x, None, None)
    with torch.no_grad():
        torch.testing.assert_close(total, full(x, None, None), rtol=0, atol=1e-6)


def test_q_k_v_have_projections_of_their_own_and_fused_weights_still_load():
    torch.manual_seed(0)
    cfg = preset("cpu-small").model
    model = GPT(cfg).eval()
    attn = model.transformer.h[0].attn
    assert not hasattr(attn, "c_attn")
    for name in QKV_PROJECTIONS:
        proj = getattr(attn, name)
        assert proj.weight.shape == (cfg.n_embd, cfg.n_embd) and proj.bias.abs().sum().item() == 0
        assert proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    fresh = GPT(cfg).eval()
    fresh.load_state_dict(fused_qkv_state(model.state_dict()))      # strict: nothing missing or unexpected
    idx = torch.randint(0, cfg.vocab_size, (2, 16))
    with torch.no_grad():
        assert torch.equal(fresh(idx)[0], model(idx)[0])
    assert fresh.transformer.h[0].attn.q_proj.weight.data_ptr() != fresh.transformer.h[0].attn.k_proj.weight.data_ptr()


def test_gpt2_initialisation_and_tied_head():
    torch.manual_seed(0)
    cfg = preset("cpu-small").model
    model = GPT(cfg)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.transformer.wte.weight.std().item() == pytest.approx(0.02, rel=0.05)
    proj = model.transformer.h[0].attn.c_proj.weight
    assert proj.std().item() == pytest.approx(0.02 / math.sqrt(2 * cfg.n_layer), rel=0.05)
    assert model.transformer.h[0].mlp.c_fc.bias.abs().sum().item() == 0
    assert model.transformer.h[0].mlp.gelu.approximate == "tanh"


def test_model_loss_equals_reference_cross_entropy():
    torch.manual_seed(0)
    model = GPT(tiny())
    idx = torch.randint(0, 50257, (2, 16))
    logits, _ = model(idx)
    _, loss = model(idx, idx)
    assert torch.allclose(loss, F.cross_entropy(logits.view(-1, 50257), idx.view(-1)), atol=1e-5)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_fused_cross_entropy_values_and_gradients(smoothing):
    torch.manual_seed(0)
    h = torch.randn(700, 24, dtype=torch.float64, requires_grad=True)
    w = torch.randn(300, 24, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 300, (700,))
    t[::5] = -100
    ref = F.cross_entropy(h @ w.T, t, label_smoothing=smoothing)
    ref_grads = torch.autograd.grad(ref * 2, (h, w))
    out = linear_cross_entropy(h, w, t, smoothing)
    grads = torch.autograd.grad(out * 2, (h, w))
    assert torch.allclose(out, ref, atol=1e-10)
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r, atol=1e-10)


def test_too_long_sequence_is_refused():
    model = GPT(tiny())
    with pytest.raises(ValueError, match="exceeds the context"):
        model(torch.zeros(1, 65, dtype=torch.long))

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from gptstack.config import preset
from gptstack.loss import linear_cross_entropy
from gptstack.kv_cache import PagedKVCache
from gptstack.model import GPT, QKV_PROJECTIONS

from test_checkpoint import fused_qkv_state


def tiny(**changes):
    return dataclasses.replace(preset("tiny").model, **changes)


def band_mask(T: int, band: int) -> torch.Tensor:
    """[T, T]: query i sees key j iff i - band < j <= i."""
    i, j = torch.arange(T)[:, None], torch.arange(T)[None]
    return (j <= i) & (j > i - band)


def no_cache_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids[None])[0][0]


def flat_step(model, cache, tables, seqs, starts, lengths) -> torch.Tensor:
    """One flat-batch forward: entry i brings seqs[i][starts[i]:starts[i] + lengths[i]]."""
    idx = torch.cat([seq[s:s + n] for seq, s, n in zip(seqs, starts, lengths)])[None]
    with torch.no_grad():
        return model.lm_head(model.hidden_states(idx, cache.batch(tables, starts, lengths)))[0]


@pytest.mark.parametrize("attention", ["dense", "alternating_banded"])
def test_paged_flat_batches_give_the_full_forward(attention):
    """Decode steps and prompt chunks of several sequences in one forward, each sequence's blocks
    scattered over the pool, chunks longer than the band and of different lengths: every token's
    logits equal the no-cache forward's (fp32, atol 1e-5)."""
    torch.manual_seed(0)
    cfg = tiny(attention=attention, band_width=5, n_layer=4)
    model = GPT(cfg).eval()
    seqs = [torch.randint(0, cfg.vocab_size, (n,)) for n in (40, 31, 23)]
    refs = [no_cache_logits(model, s) for s in seqs]
    cache = PagedKVCache.allocate(cfg, num_blocks=30, block_size=4)
    tables = torch.randperm(30).view(3, 10)          # 10 blocks of 4 positions each, in no order
    done = [0, 0, 0]
    # steps as an engine would make them: one-token rows first, then chunks of varying length
    schedule = [[(0, 12), (1, 3), (2, 7)], [(1, 1), (0, 9), (2, 11)], [(0, 1), (1, 1), (2, 1)],
                [(2, 1), (0, 17), (1, 20)], [(2, 3)]]
    for step in schedule:
        rows = [i for i, _ in step]
        logits = flat_step(model, cache, tables[rows], [seqs[i] for i in rows], [done[i] for i in rows],
                           [n for _, n in step])
        offset = 0
        for i, n in step:
            torch.testing.assert_close(logits[offset:offset + n], refs[i][done[i]:done[i] + n], rtol=0, atol=1e-5)
            offset, done[i] = offset + n, done[i] + n
    assert done == [39, 25, 23]


def test_flat_batch_wants_one_token_rows_first():
    cfg = tiny()
    cache = PagedKVCache.allocate(cfg, num_blocks=4, block_size=4)
    with pytest.raises(ValueError, match="one-token sequences must come first"):
        cache.batch(torch.zeros(2, 2, dtype=torch.long), [0, 0], [3, 1])


def test_paged_cache_sizes():
    cfg = tiny(n_layer=4)
    cache = PagedKVCache.allocate(cfg, num_blocks=6, block_size=8)
    assert cache.num_blocks == 6
    assert cache.nbytes == 6 * PagedKVCache.block_bytes(cfg, 8, torch.float32) == 6 * 8 * 2 * 4 * cfg.n_embd * 4


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
    mask = band_mask(T, band)
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    local = local_attention(q, k, v, band)   # band >= T: one padded block
    torch.testing.assert_close(local, dense, rtol=1e-5, atol=1e-6)
    grads_dense = torch.autograd.grad(dense.square().sum(), (q, k, v))
    grads_local = torch.autograd.grad(local.square().sum(), (q, k, v))
    for a, b in zip(grads_local, grads_dense):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_banded_layer_sees_only_its_window():
    mask = band_mask(6, 3)
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
    y, y_moved = attn(x), attn(moved)
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
            total = total + shard(x)
    with torch.no_grad():
        torch.testing.assert_close(total, full(x), rtol=0, atol=1e-6)


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

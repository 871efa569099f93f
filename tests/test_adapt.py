"""Fine-tuning: SFT masking and packing, LoRA, freezing, classification, resume, config errors."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
import torch.nn.functional as F
from jinja2.sandbox import ImmutableSandboxedEnvironment
from safetensors.torch import load_file

from conftest import (REPO, assert_same_tensors, assert_torchrun_matches_one_process, checkpoint_tensors, run_cli,
                      tiny_finetune_overrides, write_sentiment)
from gptstack.data.records import IGNORE_INDEX, encode_sft, pack_windows, read_records
from gptstack.adapt.finetune import FinetuneConfig, finetune
from gptstack.chat import DEFAULT_CHAT_TEMPLATE, chat_segments
from gptstack.checkpoint import load_classifier, load_model, save_checkpoint
from gptstack.config import ConfigError, ModelConfig, build_train_config
from gptstack.lora import LoRAConfig, LoRALinear, add_lora, merge_lora
from gptstack.model import GPT, QKV_PROJECTIONS
from gptstack.tokenizer import load_tokenizer
from gptstack.train.metrics import read_metrics

from test_checkpoint import saved_before_the_qkv_split

SST2 = REPO / "src" / "gptstack" / "assets" / "sst2" / "train.tsv"


def ft_config(base, data, out, **extra) -> FinetuneConfig:
    return build_train_config(overrides=tiny_finetune_overrides(base, data, out, **extra), cls=FinetuneConfig)


def test_shipped_sst2_is_the_genuine_copy():
    assert hashlib.sha256(SST2.read_bytes()).hexdigest() == \
        "92353770071a2a889f75d000a38a9e541ea8f0a5499e50f040b17917a5cbf66f"
    records = read_records(SST2)
    assert len(records) == 6735 and {r["label"] for r in records} == {"0", "1"}


# --- SFT data: masking and packing ------------------------------------------------------------------

def test_sft_targets_cover_only_response_tokens():
    tok = load_tokenizer("gpt2")
    records = [{"prompt": "Summarize: the cat sat on the mat.\nTL;DR:", "response": " cat on mat"},
               {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                             {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"},
                             {"role": "assistant", "content": "Goodbye."}]}]
    examples = encode_sft(records, tok, "test")
    x, y, _, truncated = pack_windows(examples, block_size=64, pad_id=tok.eot_id)
    assert x.shape == y.shape == (1, 64) and truncated == 0      # both fit one window
    learned = [t for t in y[0].tolist() if t != IGNORE_INDEX]
    # exactly the responses and their end-of-text, in order (the longer example is packed first)
    expected = (tok.encode(" Hello.\n") + tok.encode(" Goodbye.\n") + [tok.eot_id]
                + tok.encode(" cat on mat") + [tok.eot_id])
    assert learned == expected
    # every prompt token is an ignored target
    prompt_ids = tok.encode("Summarize: the cat sat on the mat.\nTL;DR:")
    flat = x[0].tolist()
    start = next(i for i in range(len(flat)) if flat[i:i + len(prompt_ids)] == prompt_ids)
    assert all(t == IGNORE_INDEX for t in y[0, start:start + len(prompt_ids) - 1].tolist())



@pytest.mark.parametrize("attention", ["dense", "alternating_banded"])
def test_packed_conversations_cannot_attend_across_the_boundary(attention):
    """The logits of a packed window equal those of each conversation run alone (positions from
    0, no attention to the neighbour), for dense and GPT-3's banded layers alike."""
    tok = load_tokenizer("gpt2")
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=128, n_layer=2, n_head=2, n_embd=32, embd_pdrop=0,
                            attn_pdrop=0, resid_pdrop=0, attention=attention, band_width=8)).eval()
    conversations = [{"messages": [{"role": "user", "content": f"Question {i}: " + "why? " * (3 + 4 * i)},
                                   {"role": "assistant", "content": "Because. " * (2 + i)}]} for i in range(3)]
    examples = encode_sft(conversations, tok, "test")
    x, y, documents, _ = pack_windows(examples, block_size=128, pad_id=tok.eot_id)
    assert len(x) == 1 and documents[0].unique().numel() == 4        # three conversations and the padding
    packed = model(x, documents=documents)[0][0]
    for d in range(3):
        where = (documents[0] == d).nonzero().squeeze(1)
        alone = model(x[:, where])[0][0]
        torch.testing.assert_close(packed[where], alone, rtol=1e-4, atol=1e-4)
    # and without documents the same window does leak: the check above can fail
    assert not torch.allclose(model(x)[0][0][documents[0] == 1], model(x[:, documents[0] == 1])[0][0], atol=1e-3)

def test_loss_ignores_prompt_tokens():
    """The fused loss over masked targets equals cross-entropy on the response positions alone,
    and changing what the prompt positions 'should' predict changes nothing."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=300, block_size=32, n_layer=2, n_head=2, n_embd=32, embd_pdrop=0,
                            attn_pdrop=0, resid_pdrop=0)).eval()
    x = torch.randint(0, 300, (2, 32))
    y = torch.randint(0, 300, (2, 32))
    mask = torch.zeros(2, 32, dtype=torch.bool)
    mask[:, 20:] = True
    masked = y.masked_fill(~mask, IGNORE_INDEX)
    _, loss = model(x, masked)
    logits, _ = model(x)
    manual = F.cross_entropy(logits[mask], y[mask])
    torch.testing.assert_close(loss, manual, rtol=1e-5, atol=1e-5)
    other = masked.clone()
    other[:, :20] = IGNORE_INDEX
    assert torch.equal(model(x, other)[1], loss)


def test_chat_format_matches_the_server_template():
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "How are you?"}]
    segments = chat_segments(messages + [{"role": "assistant", "content": "Fine."}])
    prompt = "".join(text for text, _ in segments[:-1])
    rendered = ImmutableSandboxedEnvironment().from_string(DEFAULT_CHAT_TEMPLATE).render(messages=messages)
    assert prompt == rendered


def test_long_examples_keep_their_response():
    tok = load_tokenizer("gpt2")
    examples = encode_sft([{"prompt": "word " * 100, "response": " the answer"}], tok, "test")
    x, y, _, truncated = pack_windows(examples, block_size=16, pad_id=tok.eot_id)
    assert truncated == 1
    assert [t for t in y[0].tolist() if t != IGNORE_INDEX] == tok.encode(" the answer") + [tok.eot_id]


# --- LoRA ----------------------------------------------------------------------------------------------

def test_lora_merge_gives_the_same_logits():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=500, block_size=32, n_layer=2, n_head=2, n_embd=32, embd_pdrop=0, attn_pdrop=0,
                      resid_pdrop=0)
    model = GPT(cfg).eval()
    x = torch.randint(0, 500, (3, 32))
    base_logits = model(x)[0]
    add_lora(model, LoRAConfig(rank=4, alpha=8))
    wrapped = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert len(wrapped) == 6 * cfg.n_layer          # q, k, v, attention out, MLP up and down
    torch.testing.assert_close(model(x)[0], base_logits)        # B starts at zero: nothing changes yet
    for m in wrapped:
        torch.nn.init.normal_(m.lora_B, std=0.05)
    adapted = model(x)[0]
    assert not torch.allclose(adapted, base_logits, atol=1e-3)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {n for n, _ in model.named_parameters() if n.endswith(("lora_A", "lora_B"))}
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    torch.testing.assert_close(model(x)[0], adapted, rtol=1e-4, atol=1e-4)


def test_lora_adapters_on_the_fused_c_attn_still_load(tmp_path):
    """Before q, k and v had projections of their own, an adapter sat on ``c_attn``: one A [r, C],
    one B [3C, r]. Such a checkpoint loads as A copied to each projection and B's rows split, and
    computes what the fused adapter computed."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=500, block_size=32, n_layer=2, n_head=2, n_embd=32, embd_pdrop=0, attn_pdrop=0,
                      resid_pdrop=0)
    model = add_lora(GPT(cfg).eval(), LoRAConfig(rank=4, alpha=8, targets=["c_attn", "c_fc"]))
    assert model.lora_config["targets"] == ["q_proj", "k_proj", "v_proj", "c_fc"]
    for block in model.transformer.h:
        shared_a = torch.randn(4, cfg.n_embd) * 0.1          # what a fused adapter amounts to
        for name in QKV_PROJECTIONS:
            getattr(block.attn, name).lora_A.data.copy_(shared_a)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            torch.nn.init.normal_(m.lora_B, std=0.05)
    save_checkpoint(tmp_path / "ck", model, load_tokenizer("gpt2"))
    saved_before_the_qkv_split(tmp_path / "ck")
    adapter = load_file(tmp_path / "ck" / "adapter.safetensors")
    fused_a, fused_b = adapter["transformer.h.0.attn.c_attn.lora_A"], adapter["transformer.h.0.attn.c_attn.lora_B"]
    assert fused_b.shape == (3 * cfg.n_embd, 4)

    apart, _, _ = load_model(tmp_path / "ck", merge_adapter=False)
    attn = apart.transformer.h[0].attn
    weights = load_file(tmp_path / "ck" / "model.safetensors")
    x = torch.randn(3, cfg.n_embd)
    fused_out = F.linear(x, weights["transformer.h.0.attn.c_attn.weight"], weights["transformer.h.0.attn.c_attn.bias"]) \
        + 2.0 * (x @ fused_a.T) @ fused_b.T                # alpha / rank = 2
    with torch.no_grad():
        torch.testing.assert_close(torch.cat(attn.project_qkv(x), dim=-1), fused_out)
    idx = torch.randint(0, 500, (2, 32))
    merged, _, _ = load_model(tmp_path / "ck")
    with torch.no_grad():
        torch.testing.assert_close(apart(idx)[0], model(idx)[0])
        torch.testing.assert_close(merged(idx)[0], model(idx)[0], rtol=1e-4, atol=1e-4)


def test_lora_finetune_keeps_adapters_apart_and_base_frozen(tiny_checkpoint, tmp_path):
    data = write_sentiment(tmp_path / "s.tsv", 400)
    result = finetune(ft_config(tiny_checkpoint, data, tmp_path / "run", lora_rank=8, lora_dropout=0.0,
                                lora_merge=False, max_steps=300, learning_rate=5e-3, eval_interval=150))
    assert result.metrics["accuracy"] >= 0.9, result.metrics
    best = tmp_path / "run" / "best"
    adapter = load_file(best / "adapter.safetensors")
    assert adapter and all(k.endswith(("lora_A", "lora_B")) for k in adapter)
    config = json.loads((best / "config.json").read_text())
    assert config["adapter"]["rank"] == 8 and config["head"]["labels"] == ["0", "1"]
    base = load_file(tiny_checkpoint / "model.safetensors")
    stored = load_file(best / "model.safetensors")
    assert all(torch.equal(base[k], stored[k]) for k in base)     # base weights untouched
    # merged on load (the default) and kept apart give the same classifier
    merged, tok, _ = load_classifier(best)
    separate, _, _ = load_classifier(best, merge_adapter=False)
    assert any(isinstance(m, LoRALinear) for m in separate.modules())
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    ids = [tok.encode("the plot was superb , the film too") + [tok.eot_id], tok.encode("dull") + [tok.eot_id]]
    torch.testing.assert_close(merged.predict(ids), separate.predict(ids), rtol=1e-4, atol=1e-4)


def test_freezing_leaves_layers_and_embeddings_unchanged(tiny_checkpoint, tmp_path):
    data = write_sentiment(tmp_path / "s.tsv", 200)
    finetune(ft_config(tiny_checkpoint, data, tmp_path / "run", freeze_layers=1, freeze_embeddings=True, max_steps=10))
    before = load_file(tiny_checkpoint / "model.safetensors")
    after = load_file(tmp_path / "run" / "best" / "model.safetensors")
    frozen = [k for k in before if k.startswith(("transformer.wte", "transformer.wpe", "transformer.h.0."))]
    trained = [k for k in before if k.startswith("transformer.h.1.") and k.endswith("weight")]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert trained and all(not torch.equal(before[k], after[k]) for k in trained)


# --- classification ---------------------------------------------------------------------------------

def test_classifier_learns_and_loads_everywhere(tiny_classifier, tmp_path):
    config = json.loads((tiny_classifier / "config.json").read_text())
    assert config["meta"]["metrics"]["accuracy"] >= 0.95
    classifier, tok, _ = load_classifier(tiny_classifier)
    probs = classifier.predict([tok.encode("this movie was wonderful , the plot too") + [tok.eot_id],
                                tok.encode("this movie was awful , the plot too") + [tok.eot_id]])
    assert probs.argmax(-1).tolist() == [1, 0]
    torch.testing.assert_close(probs.sum(-1), torch.ones(2))
    # `gptstack generate` reads the same checkpoint (its LM head is the backbone's)
    proc = run_cli("generate", "--checkpoint", str(tiny_classifier), "--prompt", "ROMEO:", "--max-new-tokens", "5",
                   "--seed", "1", check=True)
    assert proc.stdout.startswith("ROMEO:")


def test_mean_pooling_reads_every_real_token_and_survives_a_save(tiny_checkpoint, tmp_path):
    data = write_sentiment(tmp_path / "s.tsv", 120)
    finetune(ft_config(tiny_checkpoint, data, tmp_path / "run", pooling="mean", max_steps=6, eval_interval=3))
    assert json.loads((tmp_path / "run" / "best" / "config.json").read_text())["head"]["pooling"] == "mean"
    classifier, tok, _ = load_classifier(tmp_path / "run" / "best")
    assert classifier.pooling == "mean"
    short, long = tok.encode("awful") + [tok.eot_id], tok.encode("a wonderful movie , truly") + [tok.eot_id]
    # right padding changes nothing: a batch gives what each text gives alone
    torch.testing.assert_close(classifier.predict([short, long]),
                               torch.cat([classifier.predict([short]), classifier.predict([long])]))
    # the head reads the average state: equal to averaging the backbone's states by hand
    with torch.inference_mode():
        hidden = classifier.gpt.hidden_states(torch.tensor([long]))[0].mean(0)
        expected = torch.softmax(classifier.head(hidden).float(), -1)
    torch.testing.assert_close(classifier.predict([long])[0], expected, atol=1e-5, rtol=1e-4)
    with pytest.raises(ConfigError, match="pooling must be one of"):
        ft_config(tiny_checkpoint, data, tmp_path / "bad", pooling="max")


def test_best_checkpoint_by_a_task_metric(tiny_checkpoint, tmp_path):
    data = write_sentiment(tmp_path / "s.tsv", 300)
    result = finetune(ft_config(tiny_checkpoint, data, tmp_path / "run", best_metric="f1_macro", max_steps=40,
                                eval_interval=5))
    evals = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "val_f1_macro" in r]
    best = max(evals, key=lambda r: r["val_f1_macro"])      # the first of equals wins
    assert result.metrics["step"] == best["step"] and result.metrics["f1_macro"] == best["val_f1_macro"]
    meta = json.loads((tmp_path / "run" / "best" / "config.json").read_text())["meta"]
    assert meta["step"] == best["step"]


def test_class_weights_balanced(tiny_checkpoint, tmp_path):
    from gptstack.adapt.finetune import class_weights
    labels = ["a"] * 6 + ["b"] * 2
    # n / (k * count): 8 / (2 * 6) and 8 / (2 * 2)
    torch.testing.assert_close(class_weights("balanced", labels, ["a", "b"]), torch.tensor([8 / 12, 8 / 4]))
    torch.testing.assert_close(class_weights("1,3", labels, ["a", "b"]), torch.tensor([1.0, 3.0]))
    assert class_weights("none", labels, ["a", "b"]) is None
    with pytest.raises(ConfigError, match="class_weights has 3 values"):
        class_weights("1,2,3", labels, ["a", "b"])


def test_finetune_resumes_exactly(tiny_checkpoint, tmp_path):
    data = write_sentiment(tmp_path / "s.tsv", 200)
    whole = finetune(ft_config(tiny_checkpoint, data, tmp_path / "whole", max_steps=12, eval_interval=4))

    class Crash(Exception):
        pass

    def crash_at_8(step, total_steps, results):
        if step == 8:
            raise Crash

    with pytest.raises(Crash):
        finetune(ft_config(tiny_checkpoint, data, tmp_path / "split", max_steps=12, eval_interval=4), on_eval=crash_at_8)
    resumed = finetune(ft_config(tiny_checkpoint, data, tmp_path / "split", max_steps=12, eval_interval=4, resume=True))
    assert resumed.metrics == whole.metrics
    assert_same_tensors(checkpoint_tensors(tmp_path / "whole" / "last"), checkpoint_tensors(tmp_path / "split" / "last"))


def test_finetune_under_torchrun_matches_one_process(tiny_checkpoint, tmp_path):
    """2 CPU processes with one micro-batch each equal one process accumulating both, bit for bit."""
    data = write_sentiment(tmp_path / "s.tsv", 200)
    overrides = tiny_finetune_overrides(tiny_checkpoint, data, tmp_path, batch_size=4, max_steps=6, eval_interval=3,
                                        log_interval=1, **{"model.clf_pdrop": 0.0})
    # every rank scores the whole validation set, so even val_loss is exact
    assert_torchrun_matches_one_process("finetune", overrides, ("loss", "val_loss", "val_accuracy"))


def test_sft_finetune_lowers_response_loss(tiny_checkpoint, tmp_path):
    data = tmp_path / "pairs.jsonl"
    words = {"cat": "chat", "dog": "chien", "house": "maison", "water": "eau", "bread": "pain", "sun": "soleil"}
    rows = [{"prompt": f"English: {en}\nFrench:", "response": f" {fr}"} for _ in range(20) for en, fr in words.items()]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = finetune(ft_config(tiny_checkpoint, data, tmp_path / "run", task="sft", batch_size=2, max_steps=30,
                                learning_rate=3e-3, eval_interval=10))
    losses = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in losses if "val_loss" in r]
    assert val[-1] < val[0] and result.best_val_loss == min(val)
    model, _, config = load_model(tmp_path / "run" / "best")
    assert config["meta"]["train_config"]["task"] == "sft" and "head" not in config


# --- errors at the boundary ----------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    ([], "init_from is required"),
    (["--init_from", "CK", "--model.n_layer", "4"], "may only set"),
    (["--init_from", "CK", "--task", "regression"], "task must be one of"),
    (["--init_from", "CK", "--lora_rank", "4", "--lora_targets", "c_attn,wte"], "not projections"),
    (["--init_from", "CK", "--class_weights", "1,x"], "class_weights must be"),
    (["--init_from", "CK", "--task", "sft", "--best_metric", "accuracy"], "best_metric must be one of"),
    (["--init_from", "CK", "--preset", "gpt2"], "only apply to pretraining"),
])
def test_finetune_config_errors(tiny_checkpoint, tmp_path, args, message):
    data = write_sentiment(tmp_path / "s.tsv", 20)
    args = [str(tiny_checkpoint) if a == "CK" else a for a in args]
    proc = run_cli("finetune", "--data", str(data), "--out_dir", str(tmp_path / "o"), *args)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


def test_finetune_data_errors(tiny_checkpoint, tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("sentence\tlabel\nfine\t1\nmissing a column\n")
    proc = run_cli("finetune", "--init_from", str(tiny_checkpoint), "--data", str(bad), "--out_dir", str(tmp_path / "o"))
    assert proc.returncode == 2 and "bad.tsv:3" in proc.stderr
    nolabel = tmp_path / "x.jsonl"
    nolabel.write_text('{"text": "hello"}\n' * 10)
    proc = run_cli("finetune", "--init_from", str(tiny_checkpoint), "--data", str(nolabel), "--out_dir", str(tmp_path / "o"))
    assert proc.returncode == 2 and "no label column 'label'" in proc.stderr
    with pytest.raises(ConfigError):
        ft_config(tiny_checkpoint, bad, tmp_path, val_fraction=1.5)


def test_dialogue_recipe_end_to_end(tiny_checkpoint, tmp_path):
    """configs/dialogue.yaml on the shipped conversations (shortened): the checkpoint carries the
    chat format it was trained in, and a live server answers a multi-turn chat with it."""
    from conftest import Server
    openai = pytest.importorskip("openai")
    run_cli("finetune", "--config", str(REPO / "configs" / "dialogue.yaml"), "--init_from", str(tiny_checkpoint),
            "--out_dir", str(tmp_path / "run"), "--max_epochs", "0", "--max_steps", "12", "--eval_interval", "6",
            "--progress", "False", "--tensorboard", "False", "--dtype", "fp32", check=True)
    _, _, config = load_model(tmp_path / "run" / "best")
    assert config["meta"]["chat_template"] == DEFAULT_CHAT_TEMPLATE
    server = Server(tmp_path / "run" / "best")
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=server.key, max_retries=0)
        messages = [{"role": "system", "content": "You are the assistant of Quill & Page, a bookshop."},
                    {"role": "user", "content": "Do you have Emma?"},
                    {"role": "assistant", "content": "Yes, we have 3 copies of Emma at 7 pounds."},
                    {"role": "user", "content": "Can you reserve it for me?"}]
        reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
        assert reply.choices[0].message.role == "assistant" and reply.usage.completion_tokens > 0
        assert reply.usage.prompt_tokens == len(load_tokenizer("gpt2").encode(
            ImmutableSandboxedEnvironment().from_string(DEFAULT_CHAT_TEMPLATE).render(messages=messages)))
    finally:
        server.stop()


def test_shipped_dialogue_set_is_what_its_script_writes(tmp_path):
    """The conversations ship with the script that wrote them: both must agree."""
    import subprocess
    import sys
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_dialogue.py"), str(tmp_path / "b.jsonl")], check=True)
    shipped = REPO / "src" / "gptstack" / "assets" / "dialogue" / "bookshop.jsonl"
    assert (tmp_path / "b.jsonl").read_bytes() == shipped.read_bytes()
    assert all(json.loads(line)["messages"][-1]["role"] == "assistant" for line in shipped.read_text().splitlines())


def test_conversations_with_tool_calls_learn_the_calls_not_the_results():
    tok = load_tokenizer("gpt2")
    tools = [{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]
    call = {"id": "c1", "type": "function", "function": {"name": "get_time", "arguments": "{\"tz\": \"UTC\"}"}}
    record = {"tools": tools, "messages": [{"role": "user", "content": "Time?"},
                                           {"role": "assistant", "content": None, "tool_calls": [call]},
                                           {"role": "tool", "tool_call_id": "c1", "content": "12:00"},
                                           {"role": "assistant", "content": "Noon."}]}
    (ids, learn), = encode_sft([record], tok, "test")
    learned = tok.decode([t for t, m in zip(ids, learn) if m])
    assert learned == ' <tool_call>[{"name": "get_time", "arguments": {"tz": "UTC"}}]\n Noon.\n<|endoftext|>'
    assert tok.decode(ids).startswith('Tools: [{"name": "get_time"') and "Tool: 12:00\n" in tok.decode(ids)

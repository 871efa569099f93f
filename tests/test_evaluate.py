"""Evaluation: every metric against values worked out by hand, the sliding window, the CLI and reports."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from conftest import run_cli, tiny_finetune_overrides
from gptstack.adapt.finetune import FinetuneConfig, finetune
from gptstack.chat import DEFAULT_CHAT_STOPS
from gptstack.checkpoint import load_model
from gptstack.config import build_train_config
from gptstack.evaluate.metrics import classification_metrics, language_model_metrics, rouge
from gptstack.evaluate.tasks import sliding_windows


def test_classification_metrics_by_hand():
    # confusion (rows true a, b, c; columns predicted): [2 1 0] [0 1 1] [0 0 1]
    m = classification_metrics([0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 2, 2], ["a", "b", "c"])
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert m["accuracy"] == pytest.approx(4 / 6)
    a, b, c = (m["per_class"][k] for k in "abc")
    assert (a["precision"], a["recall"], a["f1"], a["support"]) == pytest.approx((1.0, 2 / 3, 0.8, 3))
    assert (b["precision"], b["recall"], b["f1"], b["support"]) == pytest.approx((0.5, 0.5, 0.5, 2))
    assert (c["precision"], c["recall"], c["f1"], c["support"]) == pytest.approx((0.5, 1.0, 2 / 3, 1))
    assert m["precision_macro"] == pytest.approx(2 / 3)
    assert m["recall_macro"] == pytest.approx((2 / 3 + 0.5 + 1) / 3)
    assert m["f1_macro"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)


def test_classification_metrics_zero_division_and_errors():
    m = classification_metrics([0, 0, 1], [0, 0, 0], ["neg", "pos"])   # "pos" is never predicted
    assert m["per_class"]["pos"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert m["per_class"]["neg"]["precision"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="2 references but 1 predictions"):
        classification_metrics([0, 1], [0], ["a", "b"])


def test_language_model_metrics_by_hand():
    m = language_model_metrics(nll_sum=6.0, tokens=3, n_bytes=12)
    assert m["loss"] == pytest.approx(2.0)
    assert m["perplexity"] == pytest.approx(math.exp(2.0))
    assert m["bits_per_byte"] == pytest.approx(6.0 / math.log(2) / 12)


def test_rouge_by_hand():
    # "the cat sat" vs "the cat sat on the mat": 3 of 6 reference unigrams, 2 of 5 bigrams, LCS 3
    r = rouge(["the cat sat", "a dog"], ["the cat sat on the mat", "a dog"])
    assert r["rouge1"]["precision"] == pytest.approx(1.0)
    assert r["rouge1"]["recall"] == pytest.approx((0.5 + 1) / 2)
    assert r["rouge1"]["f1"] == pytest.approx((2 / 3 + 1) / 2)
    assert r["rouge2"]["recall"] == pytest.approx((0.4 + 1) / 2)
    assert r["rouge2"]["f1"] == pytest.approx((2 * 0.4 / 1.4 + 1) / 2)
    assert r["rougeL"]["f1"] == pytest.approx((2 / 3 + 1) / 2)


@pytest.mark.parametrize("n, block, stride", [(10, 4, 2), (10, 4, 4), (9, 4, 1), (100, 16, 5), (3, 8, 4)])
def test_sliding_window_scores_every_token_once_with_context(n, block, stride):
    scored = []
    for start, first in sliding_windows(n, block, stride):
        end = min(start + block, n - 1)
        for position in range(first, end + 1):
            scored.append(position)
            assert position - start >= min(position, block - stride)   # tokens of context before it
    assert scored == list(range(1, n))


def test_lm_eval_matches_a_direct_forward_pass(tiny_checkpoint, tmp_path):
    text = "ROMEO:\nBut soft, what light through yonder window breaks?\nIt is the east, and Juliet is the sun.\n"
    path = tmp_path / "short.txt"
    path.write_text(text)
    out = tmp_path / "r.json"
    run_cli("eval", "--checkpoint", str(tiny_checkpoint), "--data", str(path), "--dtype", "fp32", "--json", str(out),
            "--quiet", check=True)
    result = json.loads(out.read_text())
    model, tok, _ = load_model(tiny_checkpoint)
    ids = torch.tensor([tok.encode(text)])
    with torch.no_grad():
        _, loss = model(ids[:, :-1], ids[:, 1:])
    assert result["task"] == "lm" and result["tokens"] == ids.shape[1] - 1
    assert result["loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert result["bits_per_byte"] == pytest.approx(loss.item() * result["tokens"] / math.log(2) / len(text.encode()),
                                                    rel=1e-5)


def test_lm_eval_of_a_long_text_and_a_prepared_dataset(tiny_checkpoint, shakespeare, tmp_path):
    out = tmp_path / "r.json"
    proc = run_cli("eval", "--checkpoint", str(tiny_checkpoint), "--data", str(shakespeare), "--max-tokens", "2000",
                   "--stride", "128", "--json", str(out), "--quiet", check=True)
    result = json.loads(out.read_text())
    assert result["tokens"] == 1999 and result["stride"] == 128 and 1 < result["perplexity"] < 50257
    assert "perplexity" in proc.stdout and "bits_per_byte" in proc.stdout


def test_classifier_eval_report_and_json(tiny_classifier, tmp_path):
    val = tiny_classifier.parent / "splits" / "val.jsonl"
    out, html, png = tmp_path / "r.json", tmp_path / "report.html", tmp_path / "report.png"
    proc = run_cli("eval", "--checkpoint", str(tiny_classifier), "--data", str(val), "--json", str(out),
                   "--report", str(html), "--quiet", "--dtype", "fp32", check=True)   # as the fine-tune scored
    result = json.loads(out.read_text())
    meta = json.loads((tiny_classifier / "config.json").read_text())["meta"]["metrics"]
    assert result["task"] == "classification"
    assert result["accuracy"] == pytest.approx(meta["accuracy"]) and result["f1_macro"] == pytest.approx(meta["f1_macro"])
    assert sum(map(sum, result["confusion_matrix"])) == result["examples"]
    assert "confusion matrix" in proc.stdout and "f1_macro" in proc.stdout
    page = html.read_text()
    assert page.count("<img") == 2 and "Confusion matrix" in page and "Loss curves" in page
    run_cli("eval", "--checkpoint", str(tiny_classifier), "--data", str(val), "--report", str(png), "--quiet", check=True)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def greedy_reply(model, tok, prompt: str, n: int) -> str:
    """What greedy decoding writes after ``prompt``, recomputed without a cache, cut as the eval cuts it
    (at end-of-text or a new chat turn) and stripped."""
    ids = tok.encode(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0][0, -1].argmax()))
    reply = ids[len(tok.encode(prompt)):]
    text = tok.decode(reply[:reply.index(tok.eot_id)] if tok.eot_id in reply else reply)
    return min((text[:text.index(s)] for s in DEFAULT_CHAT_STOPS if s in text), key=len, default=text).strip()


def test_generation_eval_scores_the_greedy_replies(tiny_checkpoint, tmp_path):
    """One reference is the model's own greedy reply (ROUGE 1), the other shares no word with it
    (ROUGE 0): every mean precision, recall and F1 is then exactly 1/2."""
    # the tiny model only writes newlines; a short SFT run teaches it words to reply with
    sft = tmp_path / "sft.jsonl"
    sft.write_text(json.dumps({"prompt": "Summary:", "response": " the king and the queen"}) + "\n")
    finetune(build_train_config(overrides=tiny_finetune_overrides(
        tiny_checkpoint, sft, tmp_path / "run", task="sft", max_steps=30, batch_size=8, eval_interval=30,
        val_fraction=0.0), cls=FinetuneConfig))
    checkpoint = tmp_path / "run" / "best"
    model, tok, _ = load_model(checkpoint)
    prompts = ["Summary:", "ROMEO:\nWhat say you?"]
    replies = [greedy_reply(model, tok, p, 8) for p in prompts]
    assert re.search(r"[a-z0-9]+[^a-z0-9]+[a-z0-9]", replies[0].lower()), replies   # two words at least
    data = tmp_path / "summaries.jsonl"
    rows = [{"prompt": prompts[0], "response": " " + replies[0]}, {"prompt": prompts[1], "response": " zzyzx qwxq"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "r.json"
    run_cli("eval", "--checkpoint", str(checkpoint), "--data", str(data), "--max-new-tokens", "8",
            "--json", str(out), "--quiet", check=True)
    result = json.loads(out.read_text())
    assert result["task"] == "generation" and result["examples"] == 2
    assert [s["prediction"] for s in result["samples"]] == replies
    assert [s["reference"] for s in result["samples"]] == [replies[0], "zzyzx qwxq"]
    for name in ("rouge1", "rouge2", "rougeL"):
        assert result["rouge"][name] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5}), name


@pytest.mark.parametrize("args, message", [
    (["--data", "missing.txt"], "does not exist"),
    (["--data", "DATA", "--task", "classification"], "no classification head"),
    (["--data", "DATA", "--report", "out.pdf"], "must end in .html or .png"),
])
def test_eval_errors(tiny_checkpoint, tmp_path, args, message):
    data = tmp_path / "t.txt"
    data.write_text("some text to score here")
    args = [str(data) if a == "DATA" else str(tmp_path / a) if a.endswith((".txt", ".pdf")) else a for a in args]
    proc = run_cli("eval", "--checkpoint", str(tiny_checkpoint), "--quiet", *args)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr

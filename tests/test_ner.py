"""Token classification (named-entity recognition): the CoNLL / JSONL reader and tag schemes, entity
metrics against seqeval, word-to-piece alignment, fine-tuning end to end, `gptstack eval`, and
/v1/ner on a live server."""

from __future__ import annotations

import hashlib
import json
import logging
import random
from pathlib import Path

import httpx
import pytest
import torch
from seqeval.metrics import classification_report
from seqeval.metrics.sequence_labeling import get_entities

from gptstack.adapt.finetune import FinetuneConfig, finetune
from gptstack.checkpoint import CheckpointError, load_classifier, load_token_classifier
from gptstack.config import ConfigError, build_train_config
from gptstack.data.conll import entity_spans, read_tagged, split_words, tags_from_spans
from gptstack.data.prepare import DataError
from gptstack.evaluate.metrics import entity_metrics
from gptstack.heads import TOKEN_CONTEXTS, joined, sentence_windows, tagging_windows
from gptstack.tokenizer import load_tokenizer

from conftest import REPO, Server, cli_args, run_cli, tiny_finetune_overrides

WNUT = REPO / "src" / "gptstack" / "assets" / "wnut17"


# --- the shipped data ------------------------------------------------------------------------------

def test_shipped_wnut17_is_the_genuine_copy():
    digests = {"train.conll": "731820e13f71af324c6b55a1575ec2ce59fbaa2a0806f8f0400b98d56cd6a7a5",
               "dev.conll": "e053b752b8155113ca66e7db08af5f2f5f43ab993694e4774f1ec5bad42312d8",
               "LICENSE": "b45d9216eb54d728d622b54463d46f1d53b62f651c8d440e7f1704109025649f"}
    for name, digest in digests.items():
        assert hashlib.sha256((WNUT / name).read_bytes()).hexdigest() == digest, name


@pytest.mark.parametrize("split, sentences, tokens, entities", [("train", 3394, 62730, 1975), ("dev", 1009, 15733, 836)])
def test_reads_wnut17_with_its_single_tab_sentence_ends(split, sentences, tokens, entities, caplog):
    with caplog.at_level(logging.WARNING):
        records = read_tagged(WNUT / f"{split}.conll")
    assert not caplog.records                              # well-formed BIO: nothing repaired
    assert len(records) == sentences                       # splitting only on empty lines gives 1,000 in train
    assert sum(len(r["tokens"]) for r in records) == tokens
    assert sum(len(entity_spans(r["tags"])) for r in records) == entities


# --- reading -------------------------------------------------------------------------------------

def test_conll_boundaries_docstart_and_extra_columns(tmp_path):
    path = tmp_path / "x.conll"
    path.write_text("-DOCSTART- -X- O O\n\nEU NNP B-ORG\nrejects VBZ O\n\t\nPeter B-PER\nBlackburn I-PER\n"
                    "   \nBRUSSELS\tB-LOC\n\n\n")
    assert read_tagged(path) == [{"tokens": ["EU", "rejects"], "tags": ["B-ORG", "O"]},
                                 {"tokens": ["Peter", "Blackburn"], "tags": ["B-PER", "I-PER"]},
                                 {"tokens": ["BRUSSELS"], "tags": ["B-LOC"]}]


def test_jsonl_and_bioes(tmp_path):
    path = tmp_path / "x.jsonl"
    rows = [{"tokens": ["New", "York", "is", "big"], "tags": ["B-LOC", "E-LOC", "O", "O"]},
            {"tokens": ["Ann"], "tags": ["S-PER"]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    assert read_tagged(path) == rows
    assert [entity_spans(r["tags"]) for r in rows] == [[("LOC", 0, 2)], [("PER", 0, 1)]]


@pytest.mark.parametrize("name, text, message", [
    ("a.conll", "EU B-ORG\nrejects\n", "a.conll:2: expected a token and a tag"),
    ("a.conll", "EU PER\n", "a.conll:1: tag 'PER' is neither O nor B-/I-/E-/S-"),
    ("a.conll", "EU X-ORG\n", "tag 'X-ORG'"),
    ("a.conll", "\n\t\n-DOCSTART- O\n", "holds no tagged sentences"),
    ("a.jsonl", '{"tokens": ["a"], "tags": ["O"]}\n{"tokens": ["a", "b"], "tags": ["O"]}\n',
     "a.jsonl:2: \"tokens\" and \"tags\" must be non-empty lists of the same length"),
    ("a.jsonl", '{"tokens": ["a"]}\n', 'a.jsonl:1: expected an object with "tokens" and "tags"'),
    ("a.jsonl", '{"tokens": ["a"], "tags": [1]}\n', "tag 1 is neither"),
    ("a.jsonl", '{"tokens": [""], "tags": ["O"]}\n', "every token must be a non-empty string"),
    ("a.jsonl", "{nope\n", "a.jsonl line 1 is not valid JSON"),
])
def test_bad_files_give_clear_errors(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace("[", r"\[")):
        read_tagged(path)


def test_missing_and_binary_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_tagged(tmp_path / "missing.conll")
    (tmp_path / "b.conll").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(DataError, match="is not UTF-8"):
        read_tagged(tmp_path / "b.conll")


def test_ill_formed_sequences_are_repaired_with_one_warning(tmp_path, caplog):
    bio = tmp_path / "bio.conll"
    bio.write_text("a O\nb I-PER\nc I-PER\n\nd B-PER\ne I-LOC\n\nf O\n")
    with caplog.at_level(logging.WARNING):
        records = read_tagged(bio)
    assert [r["tags"] for r in records] == [["O", "B-PER", "I-PER"], ["B-PER", "B-LOC"], ["O"]]
    assert len(caplog.records) == 1
    assert "2 of 3 sentences had ill-formed BIO tag sequences (the first at line 1)" in caplog.text
    bioes = tmp_path / "bioes.conll"
    bioes.write_text("a B-PER\nb I-PER\nc O\nd S-LOC\n")     # B I without its E
    assert read_tagged(bioes)[0]["tags"] == ["B-PER", "E-PER", "O", "S-LOC"]


def test_spans_and_scores_are_seqevals():
    rng = random.Random(0)
    tags = ["O", "B-a", "I-a", "E-a", "S-a", "B-b", "I-b", "E-b", "S-b"]
    for _ in range(2000):
        seq = [rng.choice(tags) for _ in range(rng.randint(1, 9))]
        assert [(k, s, e - 1) for k, s, e in entity_spans(seq)] == get_entities(seq), seq
        for scheme in ("bio", "bioes"):    # writing spans back and reading them again is lossless
            assert entity_spans(tags_from_spans(entity_spans(seq), len(seq), scheme)) == entity_spans(seq)
    bio = ["O", "B-a", "I-a", "B-b", "I-b"]
    gold = [[rng.choice(bio) for _ in range(8)] for _ in range(300)]
    predicted = [[rng.choice(bio) for _ in range(8)] for _ in range(300)]
    ours, theirs = entity_metrics(gold, predicted), classification_report(gold, predicted, output_dict=True)
    for avg in ("micro", "macro"):
        for m in ("precision", "recall", "f1"):
            assert ours[f"{m}_{avg}"] == pytest.approx(theirs[f"{avg} avg"][m if m != "f1" else "f1-score"])
    assert ours["per_class"]["a"]["support"] == theirs["a"]["support"]


def test_type_confusion_counts_matching_spans():
    gold = [["B-PER", "I-PER", "O", "B-LOC", "O", "B-ORG"]]
    predicted = [["B-LOC", "I-LOC", "O", "B-LOC", "B-PER", "O"]]
    result = entity_metrics(gold, predicted)
    assert result["labels"] == ["LOC", "ORG", "PER", "(none)"]
    assert result["confusion_matrix"] == [[1, 0, 0, 0],     # gold LOC found as LOC
                                          [0, 0, 0, 1],     # gold ORG: no span there
                                          [1, 0, 0, 0],     # gold PER read as LOC
                                          [0, 0, 1, 0]]     # a PER where there is none
    assert result["f1_micro"] == pytest.approx(2 * (1 / 3) * (1 / 3) / (2 / 3))


# --- alignment -----------------------------------------------------------------------------------

def test_words_are_read_at_their_pieces():
    tok = load_tokenizer({"kind": "gpt2"})
    words = ["Hello", "@wonderfulworld", "!", "Paris"]
    pieces = [tok.encode(" " + w) for w in words]
    assert len(pieces[1]) > 1                             # a word of several pieces
    for context in TOKEN_CONTEXTS:
        [window] = tagging_windows(tok, words, context, 64)
        assert len(window.where) == len(words)
        for word, p, where in zip(words, pieces, window.where):
            ids = window.ids
            if context == "first":
                assert ids[where[0]] == p[0] and ids[where[0] - 1] != p[0]
            else:                                         # the state after the word's last piece
                last = where[0]
                assert ids[last] == p[-1] and tok.decode(ids[:last + 1]).endswith(" " + word)
            if context == "next":
                assert ids[where[1]] in (tok.eot_id, *[q[0] for q in pieces])
            if context == "echo":                         # read in the second copy, after the whole sentence
                assert last > len(ids) // 2 and ids[:len(ids) // 2] == ids[len(ids) // 2:]
    assert tagging_windows(tok, words, "next", 64)[0].where[-1][1] == len(tagging_windows(tok, words, "next", 64)[0].ids) - 1


def test_long_texts_are_cut_into_windows_that_fit():
    tok = load_tokenizer({"kind": "gpt2"})
    words = [f"word{i}" for i in range(40)]
    for context in TOKEN_CONTEXTS:
        windows, counts = sentence_windows(tok, [words, ["x"]], context, 16)
        assert counts[1] == 1 and counts[0] > 1
        assert all(len(w.ids) <= 16 for w in windows)
        assert sum(len(w.where) for w in windows[:counts[0]]) == 40
        joined_rows = joined([torch.arange(len(w.where)) for w in windows], counts)
        assert [len(j) for j in joined_rows] == [40, 1]
    assert len(tagging_windows(tok, ["a" * 300], "last", 16)[0].ids) <= 16   # one huge word keeps its start
    with pytest.raises(ValueError, match="non-empty"):
        tagging_windows(tok, ["a", " "], "last", 16)


def test_split_words_keeps_offsets():
    text = "Off to see @TaylorSwift13 in New York, can't wait!! http://t.co/x #tour"
    words = split_words(text)
    assert all(text[s:e] == w for w, s, e in words)
    assert [w for w, _, _ in words] == ["Off", "to", "see", "@TaylorSwift13", "in", "New", "York", ",", "can't",
                                        "wait", "!", "!", "http://t.co/x", "#tour"]


# --- fine-tuning, eval, serving ------------------------------------------------------------------

PEOPLE = ["Alice", "Bob", "Carol", "Dave", "Erin", "Frank"]
PLACES = [["Paris"], ["London"], ["Berlin"], ["Rome"], ["New", "York"], ["Oslo"]]


def write_synthetic(path: Path, n: int, seed: int = 0) -> Path:
    """People and places in a few sentence frames after 0-3 filler words (as CoNLL): learnable from
    the words themselves and their left neighbours."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        person, place = rng.choice(PEOPLE), rng.choice(PLACES)
        place_tags = ["B-location"] + ["I-location"] * (len(place) - 1)
        frame = rng.randrange(3)
        if frame == 0:
            words, tags = [person, "went", "to", *place], ["B-person", "O", "O", *place_tags]
        elif frame == 1:
            words, tags = ["we", "love", *place, "and", person], ["O", "O", *place_tags, "O", "B-person"]
        else:
            words, tags = ["I", "saw", person, "in", *place, "today"], ["O", "O", "B-person", "O", *place_tags, "O"]
        lead = rng.sample(["so", "well", "ok", "yes"], rng.randrange(4))    # entities at no fixed position
        lines += [f"{w}\t{t}" for w, t in zip(lead + words, ["O"] * len(lead) + tags)] + ["\t"]
    path.write_text("\n".join(lines) + "\n")
    return path


def wnut_slice(path: Path, sentences: int) -> Path:
    """The first sentences of WNUT train, as they are (single-tab boundaries included)."""
    out, count = [], 0
    for line in (WNUT / "train.conll").read_text().splitlines():
        out.append(line)
        count += not line.strip()
        if count == sentences:
            break
    path.write_text("\n".join(out) + "\n")
    return path


@pytest.fixture(scope="module")
def tagger(tiny_checkpoint, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("tagger")
    data = write_synthetic(work / "train.conll", 300)
    finetune(build_train_config(overrides=tiny_finetune_overrides(
        tiny_checkpoint, data, work / "run", task="token_classification", best_metric="f1_micro", max_steps=150,
        learning_rate=3e-3), cls=FinetuneConfig))
    return work / "run" / "best"


def test_tagger_learns_and_reloads(tagger):
    config = json.loads((tagger / "config.json").read_text())
    assert config["head"] == {"kind": "token_classification", "context": "first",
                              "labels": ["O", "B-location", "I-location", "B-person"]}
    assert config["meta"]["metrics"]["f1_micro"] > 0.9       # held-out sentences of the same frames
    model, tok, _ = load_token_classifier(tagger)
    windows, counts = sentence_windows(tok, [["I", "saw", "Carol", "in", "New", "York", "today"]], model.context, 256)
    tags = [model.labels[i] for i in joined(model.predict(windows), counts)[0].argmax(-1).tolist()]
    assert tags == ["O", "O", "B-person", "O", "B-location", "I-location", "O"]
    with pytest.raises(CheckpointError, match="has no classification head"):
        load_classifier(tagger)


def test_finetune_on_wnut_through_the_cli_then_eval(tiny_checkpoint, tmp_path):
    data = wnut_slice(tmp_path / "wnut.conll", 48)
    assert len(read_tagged(data)) == 48
    out = tmp_path / "run"
    args = tiny_finetune_overrides(tiny_checkpoint, data, out, max_steps=12, eval_interval=6, val_fraction=0.25,
                                   best_metric="f1_micro", token_context="next")
    run_cli("finetune", "--task", "token_classification", *cli_args(args), check=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val_f1_micro" in r] == [6, 12]
    model, _, config = load_token_classifier(out / "best")
    assert model.context == "next" and model.head.in_features == 2 * model.gpt.config.n_embd
    assert set(model.labels) == {t for r in read_tagged(out / "splits" / "train.jsonl") for t in r["tags"]}
    assert model.head.weight.abs().sum() > 0

    val = out / "splits" / "val.jsonl"
    # fp32 as the run's validation was (args' dtype): "auto" may pick bf16 on some CPUs and flip near-ties
    proc = run_cli("eval", "--checkpoint", str(out / "best"), "--data", str(val), "--json", str(tmp_path / "r.json"),
                   "--report", str(tmp_path / "r.html"), "--dtype", "fp32", check=True)
    assert "f1_micro" in proc.stdout and "confusion matrix" in proc.stdout
    results = json.loads((tmp_path / "r.json").read_text())
    assert results["task"] == "token_classification" and results["sentences"] == 12
    gold = [r["tags"] for r in read_tagged(val)]
    theirs = classification_report(gold, results["predictions"], output_dict=True, zero_division=0)
    assert results["f1_micro"] == pytest.approx(theirs["micro avg"]["f1-score"])
    assert results["f1_micro"] == pytest.approx(config["meta"]["metrics"]["f1_micro"])   # = the run's validation
    assert sum(map(sum, results["confusion_matrix"])) >= results["entities"]
    page = (tmp_path / "r.html").read_text()
    assert "Confusion matrix" in page and "Loss curves" in page


def test_finetune_config_errors(tiny_checkpoint, tmp_path):
    with pytest.raises(ConfigError, match="token_context must be one of"):
        build_train_config(overrides={"init_from": str(tiny_checkpoint), "data": "x.conll",
                                      "task": "token_classification", "token_context": "middle"},
                           cls=FinetuneConfig).validate()
    train = write_synthetic(tmp_path / "train.conll", 20)
    dev = tmp_path / "dev.conll"
    dev.write_text("Zed B-group\n")
    with pytest.raises(DataError, match=r"validation tags \['B-group'\] never occur"):
        finetune(build_train_config(overrides=tiny_finetune_overrides(
            tiny_checkpoint, train, tmp_path / "run", task="token_classification", eval_data=str(dev)),
            cls=FinetuneConfig))


def test_ner_route_on_a_live_server(tagger, server):
    s = Server(tagger, "--requests-per-minute", "2")   # two tagging requests below, then 429
    try:
        text = "I saw Carol in New York today"
        r = httpx.post(s.url + "/v1/ner", headers=s.headers, json={"input": [text, "we love Paris and Bob"]})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "list" and body["model"] == "tiny"
        first, second = (d["entities"] for d in body["data"])
        assert [(e["type"], e["text"], e["start"], e["end"]) for e in first] == [
            ("person", "Carol", 6, 11), ("location", "New York", 15, 23)]
        assert all(text[e["start"]:e["end"]] == e["text"] and 0 < e["score"] <= 1 for e in first)
        assert [e["text"] for e in second] == ["Paris", "Bob"]
        assert body["usage"]["prompt_tokens"] > 0
        assert httpx.post(s.url + "/v1/ner", json={"input": text}).status_code == 401      # the same keys
        bad = httpx.post(s.url + "/v1/ner", headers=s.headers, json={"input": "  "})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "input"
        page = httpx.get(s.url + "/").text
        assert '$("ner").hidden = !true' in page and '$("classify").hidden = !false' in page
        one = httpx.post(s.url + "/v1/ner", headers=s.headers, json={"input": text})
        assert one.status_code == 200 and one.json()["data"][0]["entities"] == first
        limited = httpx.post(s.url + "/v1/ner", headers=s.headers, json={"input": text})   # the same rate limits
        assert limited.status_code == 429 and "Retry-After" in limited.headers
    finally:
        s.stop()
    # a checkpoint without a token-classification head: 400 in OpenAI's error shape
    r = httpx.post(server.url + "/v1/ner", headers=server.headers, json={"input": "Carol went to Paris"})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "no_token_classifier" and r.json()["error"]["type"] == "invalid_request_error"


def test_playground_marks_the_entities(tagger):
    from test_playground import CHROMIUM, playground
    if CHROMIUM is None:
        pytest.skip("needs Debian's chromium (.ci/run installs it)")
    with playground(tagger) as (s, page):
        assert not page.locator("#classify").is_visible()    # a tagger, not a classifier
        page.fill("#key", s.key)
        page.fill("#prompt", "I saw Carol in New York today")
        page.click("#ner")
        page.wait_for_function("document.getElementById('status').textContent.startsWith('done')",
                               timeout=30000)
        marks = page.locator("#output mark")
        assert [marks.nth(i).get_attribute("data-type") for i in range(marks.count())] == ["person", "location"]
        assert marks.nth(1).inner_text().startswith("New York")
        shown = page.evaluate("() => { const o = document.getElementById('output').cloneNode(true); "
                              "o.querySelectorAll('small').forEach(e => e.remove()); return o.textContent; }")
        assert shown == "I saw Carol in New York today"                 # the text, unchanged around the marks

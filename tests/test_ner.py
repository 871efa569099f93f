"""Token classification (named-entity recognition): the CoNLL / JSONL reader and tag schemes, entity
metrics against seqeval, word-to-piece alignment, fine-tuning end to end, `gptstack eval`, and
/v1/ner on a live server."""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file
from seqeval.metrics import classification_report
from seqeval.metrics.sequence_labeling import get_entities

from gptstack.adapt.finetune import FinetuneConfig, finetune
from gptstack.checkpoint import CheckpointError, load_classifier, load_token_classifier
from gptstack.config import ConfigError, ModelConfig, build_train_config
from gptstack.crf import CRF, allowed_moves, scheme_potentials, viterbi
from gptstack.data.conll import FEATURES_PER_WORD, entity_spans, read_tagged, split_words, tags_from_spans, word_features
from gptstack.data.prepare import DataError
from gptstack.evaluate.metrics import entity_metrics
from gptstack.files import sha256_file
from gptstack.heads import TOKEN_CONTEXTS, TokenClassifier, pad_windows, tagging_windows
from gptstack.model import GPT
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
        windows = tagging_windows(tok, words, context, 16)
        assert len(windows) > 1 and all(len(w.ids) <= 16 for w in windows)
        assert sum(len(w.where) for w in windows) == 40
        # each window's words' features are those of the whole sentence (neighbours in other windows)
        assert [f for w in windows for f in w.features()] == word_features(words)
    assert len(tagging_windows(tok, ["a" * 300], "last", 16)[0].ids) <= 16   # one huge word keeps its start
    with pytest.raises(ValueError, match="non-empty"):
        tagging_windows(tok, ["a", " "], "last", 16)


@pytest.mark.parametrize("options", [{}, {"word_features": 512, "crf": True}])
def test_sentences_of_several_windows_tag_as_their_windows_joined(options):
    """A sentence longer than the context is read window by window and decoded whole: next to a short
    one in a batch or alone, the same tags and probabilities, and its scores are its windows' scores."""
    torch.manual_seed(0)
    tok = load_tokenizer({"kind": "gpt2"})
    gpt = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16))
    model = TokenClassifier(gpt, ["O", "B-a", "I-a", "B-b"], "first", **options).eval()
    if model.crf is not None:             # transitions that matter (they start at zero)
        with torch.no_grad():
            for p in model.crf.parameters():
                p.normal_()
    rng = random.Random(0)
    long = [rng.choice(["Paris", "@bob", "the", "New", "York", "2day", "#win"]) for _ in range(30)]
    sentences = [tagging_windows(tok, words, "first", 16) for words in (long, ["Hi", "Carol"])]
    assert len(sentences[0]) > 2 and len(sentences[1]) == 1
    with torch.inference_mode():
        scores, mask = model(sentences)
        windows = torch.cat([model([[window]])[0][0] for window in sentences[0]])
    assert mask.sum(dim=1).tolist() == [30, 2]
    torch.testing.assert_close(scores[0, :30], windows)
    batched, alone = model.tag(sentences), [model.tag([s])[0] for s in sentences]
    for (path, sure), (path_alone, sure_alone) in zip(batched, alone):
        assert path == path_alone
        torch.testing.assert_close(sure, sure_alone)
    assert len(batched[0][0]) == 30 and len(batched[1][0]) == 2
    assert pad_windows(sentences[0])[2] is None         # a head without word features never hashes them


def test_split_words_keeps_offsets():
    text = "Off to see @TaylorSwift13 in New York, can't wait!! http://t.co/x #tour"
    words = split_words(text)
    assert all(text[s:e] == w for w, s, e in words)
    assert [w for w, _, _ in words] == ["Off", "to", "see", "@TaylorSwift13", "in", "New", "York", ",", "can't",
                                        "wait", "!", "!", "http://t.co/x", "#tour"]


# --- the CRF layer and the word features ----------------------------------------------------------

def brute_force(crf: CRF, scores: torch.Tensor) -> dict[tuple[int, ...], float]:
    """Every tag sequence of one sentence [L, K] with its unnormalised log score, from the definition."""
    start, transitions, end = (t.detach() for t in crf.potentials())
    length, k = scores.shape
    return {path: float(start[path[0]] + end[path[-1]] + sum(scores[t, tag] for t, tag in enumerate(path))
                        + sum(transitions[a, b] for a, b in zip(path, path[1:])))
            for path in itertools.product(range(k), repeat=length)}


def random_crf(labels: list[str], seed: int) -> CRF:
    crf = CRF(labels)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in crf.parameters():
            p.copy_(torch.randn(p.shape, generator=generator))
    return crf


@pytest.mark.parametrize("labels", [["O", "B-a", "I-a", "B-b"], ["O", "B-a", "I-a", "E-a", "S-a"]])
def test_crf_matches_brute_force_over_every_path(labels):
    crf = random_crf(labels, seed=len(labels))
    lengths = [4, 1, 3]
    scores = torch.randn(len(lengths), max(lengths), len(labels), generator=torch.Generator().manual_seed(1))
    mask = torch.arange(max(lengths)) < torch.tensor(lengths)[:, None]
    tags = torch.randint(len(labels), (len(lengths), max(lengths)), generator=torch.Generator().manual_seed(2))
    nll, paths, marginals = crf.nll(scores, tags, mask).detach(), crf.viterbi(scores, mask), crf.marginals(scores, mask)
    for row, n in enumerate(lengths):       # padding changes nothing: each row is scored on its own
        every = brute_force(crf, scores[row, :n])
        log_z = torch.logsumexp(torch.tensor(list(every.values())), 0)
        gold = tuple(tags[row, :n].tolist())
        assert float(nll[row]) == pytest.approx(float(log_z) - every[gold], rel=1e-5, abs=1e-4)
        assert tuple(paths[row]) == max(every, key=every.get)
        for t in range(n):
            expected = [sum(torch.exp(torch.tensor(v) - log_z) for p, v in every.items() if p[t] == tag)
                        for tag in range(len(labels))]
            torch.testing.assert_close(marginals[row, t], torch.tensor(expected, dtype=torch.float), atol=1e-5, rtol=1e-4)


def test_crf_trains_and_gradients_are_finite_with_unreachable_tags():
    crf = CRF(["O", "I-a", "B-b", "I-b"])          # I-a never follows a B-a: no path reaches it
    scores = torch.randn(2, 5, 4, requires_grad=True)
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    tags = torch.tensor([[0, 2, 3, 3, 0], [2, 0, 0, 0, 0]])
    crf.nll(scores, tags, mask).sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (scores, crf.transitions, crf.start, crf.end))


@pytest.mark.parametrize("labels", [["O", "B-a", "I-a", "B-b", "I-b"], ["O", "B-a", "I-a", "E-a", "S-a", "S-b"]])
def test_viterbi_never_decodes_a_forbidden_move(labels):
    """Scores that favour I-/E- tags everywhere: still every sequence the CRF decodes, and every one
    constrained decoding of a softmax picks, is well-formed; and the latter is the softmax's own
    choice whenever that is well-formed."""
    crf = random_crf(labels, seed=3)
    inside = torch.tensor([2.0 if tag[0] in "IE" else 0.0 for tag in labels])
    scores = torch.randn(500, 4, len(labels), generator=torch.Generator().manual_seed(4)) * 3 + inside
    mask = torch.ones(500, 4, dtype=torch.bool)
    scheme = "bioes" if any(tag[0] in "ES" for tag in labels) else "bio"

    def well_formed(path: list[int]) -> bool:
        tags = [labels[i] for i in path]
        return tags_from_spans(entity_spans(tags), len(tags), scheme) == tags
    logp = torch.log_softmax(scores, -1)
    constrained = viterbi(logp, mask, *scheme_potentials(labels))
    assert all(map(well_formed, crf.viterbi(scores, mask))) and all(map(well_formed, constrained))
    own = [row.tolist() for row in logp.argmax(-1)]
    assert 0 < sum(map(well_formed, own)) < len(own)     # the test sees both cases
    assert all(c == o for c, o in zip(constrained, own) if well_formed(o))


def test_allowed_moves_follow_the_scheme():
    start, follow, end = allowed_moves(["O", "B-a", "I-a", "B-b", "I-b"])
    assert start.tolist() == [True, True, False, True, False] and end.all()
    assert follow[:, 2].tolist() == [False, True, True, False, False]      # I-a only after B-a or I-a
    assert follow[2].tolist() == [True, True, True, True, False]             # after I-a: anything but I-b
    start, follow, end = allowed_moves(["O", "B-a", "I-a", "E-a", "S-a"])
    assert start.tolist() == [True, True, False, False, True]
    assert end.tolist() == [True, False, False, True, True]
    assert follow[1].tolist() == [False, False, True, True, False]         # B-a: only I-a or E-a next


def test_word_features_are_the_same_in_every_process():
    words = ["Off", "to", "@TaylorSwift13", "in", "New", "York", "http://t.co/x", "#tour"]
    rows = word_features(words)
    assert len(rows) == len(words) and all(len(r) == FEATURES_PER_WORD for r in rows)
    code = f"from gptstack.data.conll import word_features; print(word_features({words!r}))"
    for seed in ("1", "2"):                # Python's own str hash differs with PYTHONHASHSEED
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONHASHSEED": seed}).stdout
        assert json.loads(out) == rows
    assert word_features(["new", "york"])[0] != word_features(["New", "york"])[0]     # case is seen
    assert word_features(["x", "Paris"])[0] != word_features(["x", "paris"])[0]     # and so is the next word's


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
        learning_rate=3e-3, word_features=4096, token_crf=True), cls=FinetuneConfig))
    return work / "run" / "best"


def test_tagger_learns_and_reloads(tagger):
    config = json.loads((tagger / "config.json").read_text())
    assert config["head"] == {"kind": "token_classification", "context": "first", "word_features": 4096, "crf": True,
                              "labels": ["O", "B-location", "I-location", "B-person"]}
    assert config["meta"]["metrics"]["f1_micro"] > 0.9       # held-out sentences of the same frames
    model, tok, _ = load_token_classifier(tagger)
    assert model.crf is not None and model.bag.weight.shape == (4096, model.head.in_features - model.gpt.config.n_embd)
    [(path, sure)] = model.tag([tagging_windows(tok, ["I", "saw", "Carol", "in", "New", "York", "today"], model.context, 256)])
    assert [model.labels[i] for i in path] == ["O", "O", "B-person", "O", "B-location", "I-location", "O"]
    assert ((0 < sure) & (sure <= 1)).all()
    with pytest.raises(CheckpointError, match="has no classification head"):
        load_classifier(tagger)


def test_a_head_missing_its_weights_is_a_checkpoint_error(tagger, tmp_path):
    """A config saying "crf": true over weights without the CRF's transitions (a hand-edited or
    foreign checkpoint) names the directory, not torch's state-dict error alone."""
    broken = tmp_path / "broken"
    shutil.copytree(tagger, broken)
    state = load_file(broken / "model.safetensors")
    save_file({k: v for k, v in state.items() if not k.startswith("token_classifier.crf.")}, broken / "model.safetensors")
    sums = json.loads((broken / "checksums.json").read_text())
    (broken / "checksums.json").write_text(json.dumps({**sums, "model.safetensors": sha256_file(broken / "model.safetensors")}))
    with pytest.raises(CheckpointError, match=rf"{broken} does not hold the weights of the token_classification head(.|\n)*crf"):
        load_token_classifier(broken)


@pytest.mark.parametrize("head", [{"token_context": "next"}, {"word_features": 1024, "token_crf": "true"}])
def test_finetune_on_wnut_through_the_cli_then_eval(tiny_checkpoint, tmp_path, head):
    data = wnut_slice(tmp_path / "wnut.conll", 48)
    assert len(read_tagged(data)) == 48
    out = tmp_path / "run"
    args = tiny_finetune_overrides(tiny_checkpoint, data, out, max_steps=12, eval_interval=6, val_fraction=0.25,
                                   best_metric="f1_micro", **head)
    run_cli("finetune", "--task", "token_classification", *cli_args(args), check=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val_f1_micro" in r] == [6, 12]
    model, _, config = load_token_classifier(out / "best")
    n_embd = model.gpt.config.n_embd
    if "token_crf" in head:   # the CRF's transitions and the feature table were trained and stored
        assert model.crf.transitions.abs().sum() > 0 and model.bag.weight.shape[0] == 1024
        assert model.head.in_features == n_embd + model.bag.weight.shape[1]
    else:
        assert model.context == "next" and model.crf is None and model.head.in_features == 2 * n_embd
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
    for bad, message in [({"token_context": "middle"}, "token_context must be one of"),
                         ({"word_features": -1}, "word_features is a number of hash buckets"),
                         ({"token_crf": True, "class_weights": "balanced"}, "a token_crf scores whole sentences")]:
        with pytest.raises(ConfigError, match=message):
            build_train_config(overrides={"init_from": str(tiny_checkpoint), "data": "x.conll",
                                          "task": "token_classification", **bad}, cls=FinetuneConfig).validate()
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

"""Adversarial robustness: embedding perturbations for training (FGM / PGD) and the word-level attack."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
import torch.nn.functional as F

from conftest import run_cli, tiny_finetune_overrides, write_sentiment
from gptstack.adapt.adversarial import embedding_offset, perturbation
from gptstack.adapt.finetune import FinetuneConfig, finetune
from gptstack.checkpoint import load_classifier
from gptstack.config import ConfigError, build_train_config
from gptstack.data.records import read_records
from gptstack.evaluate.attack import Attack, attack_summary, character_edits, perturb, synonym_table, synonyms
from gptstack.evaluate.tasks import EvalConfig, evaluate
from gptstack.heads import classification_ids, pad_right
from gptstack.train.metrics import read_metrics

TEXTS = ["this movie was wonderful , the plot too", "the acting was awful , every scene too",
         "the ending was superb , the film too ok", "every scene was dull"]


@pytest.fixture(scope="module")
def classifier(tiny_classifier):
    model, tokenizer, _ = load_classifier(tiny_classifier)
    return model, tokenizer


def loss_at(model, tokenizer, texts: list[str], labels: list[int]):
    """The classifier's loss on ``texts`` as a function of an offset to their token embeddings."""
    idx, lengths = pad_right([classification_ids(tokenizer, t, 64) for t in texts], torch.device("cpu"))
    real = torch.arange(idx.shape[1])[None] < lengths[:, None]

    def at(offset: torch.Tensor) -> torch.Tensor:
        with embedding_offset(model.gpt, offset):
            return F.cross_entropy(model(idx, lengths), torch.tensor(labels))
    return at, (*idx.shape, model.gpt.config.n_embd), real


def test_fgm_step_has_the_norm_and_raises_the_loss(classifier):
    at, shape, real = loss_at(*classifier, TEXTS, [1, 0, 1, 0])
    offset = perturbation(at, shape, real, epsilon=0.5, steps=1)
    torch.testing.assert_close(offset.flatten(1).norm(dim=1), torch.full((len(TEXTS),), 0.5))
    assert not offset[~real].any()                     # padding is never moved
    with torch.no_grad():
        assert at(offset) > 1.1 * at(torch.zeros(shape))
        # a random offset of the same norm raises the loss less than the gradient's direction does
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * real.unsqueeze(-1)
        noise = noise * 0.5 / noise.flatten(1).norm(dim=1)[:, None, None]
        assert at(offset) > at(noise)


def test_pgd_stays_inside_the_ball(classifier):
    at, shape, real = loss_at(*classifier, TEXTS, [1, 0, 1, 0])
    offset = perturbation(at, shape, real, epsilon=0.3, steps=4)
    assert (offset.flatten(1).norm(dim=1) <= 0.3 + 1e-5).all()
    with torch.no_grad():
        assert at(offset) > at(torch.zeros(shape))


def test_adversarial_training_adds_the_perturbed_loss_and_still_learns(tiny_checkpoint, tmp_path):
    data = write_sentiment(tmp_path / "s.tsv", 300)

    def config(out: str, **extra) -> FinetuneConfig:
        settings = {"log_interval": 1, "max_steps": 60, "eval_interval": 60, **extra}
        return build_train_config(overrides=tiny_finetune_overrides(tiny_checkpoint, data, tmp_path / out, **settings),
                                  cls=FinetuneConfig)
    finetune(config("plain", max_steps=1))
    robust = finetune(config("fgm", adversarial="fgm", adversarial_epsilon=0.1))
    first = [next(r["loss"] for r in read_metrics(tmp_path / run / "metrics.jsonl") if "loss" in r)
             for run in ("plain", "fgm")]
    assert first[1] > first[0] * 1.5       # the same clean loss (same seed) plus the loss at a worse point
    assert robust.metrics["accuracy"] >= 0.9


@pytest.mark.parametrize("extra, message", [
    ({"adversarial": "free"}, "adversarial must be one of"),
    ({"adversarial": "fgm", "adversarial_epsilon": 0.0}, "adversarial_epsilon must be > 0"),
    ({"adversarial": "pgd", "adversarial_steps": 0}, "adversarial_steps must be >= 1"),
    ({"adversarial": "fgm", "task": "sft"}, "adversarial training is for task classification"),
    ({"augment": "noise"}, "augment must be one of"),
    ({"augment": "deepwordbug", "task": "sft"}, "augment is for task classification"),
    ({"augment": "both", "augment_copies": 0}, "augment_copies must be >= 1"),
    ({"augment": "both", "augment_share": 0.0}, r"augment_share must be in \(0, 1\]"),
])
def test_adversarial_config_errors(tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message):
        build_train_config(overrides={"init_from": "x", "data": "y.tsv", "out_dir": str(tmp_path), **extra},
                           cls=FinetuneConfig)


def test_perturb_changes_the_share_of_words_with_the_attacks_moves():
    text = "the film was good , the cast was great and the story was fine too ; I liked it a lot"
    words = text.split()
    for seed in range(20):
        edited = perturb(text, "deepwordbug", 0.1, random.Random(seed)).split()
        changed = [(a, b) for a, b in zip(words, edited) if a != b]
        assert len(edited) == len(words) and len(changed) == math.ceil(0.1 * len(words))
        assert all(b in character_edits(a, random.Random(0), 10_000) for a, b in changed)
        assert all(a != "," and a != ";" for a, _ in changed)       # only words with letters move
    swapped = [perturb("good", "synonym", 0.1, random.Random(seed)) for seed in range(20)]
    assert set(swapped) <= set(synonyms("good")) and len(set(swapped)) > 1


def test_augmented_training_walks_the_copies(tiny_checkpoint, tmp_path):
    """An epoch covers the texts and their edited copies: (1 + copies) times the steps of a plain epoch."""
    data = write_sentiment(tmp_path / "s.tsv", 200)

    def steps(out: str, **extra) -> int:
        overrides = tiny_finetune_overrides(tiny_checkpoint, data, tmp_path / out, max_steps=0, max_epochs=1,
                                            eval_interval=1000, **extra)
        return finetune(build_train_config(overrides=overrides, cls=FinetuneConfig)).steps
    plain = steps("plain")
    assert steps("augmented", augment="deepwordbug", augment_copies=2) == 3 * plain


def test_edits_and_synonyms():
    edits = character_edits("wonderful", random.Random(0), 8)
    assert len(edits) == len(set(edits)) == 8 and "wonderful" not in edits
    assert all(abs(len(e) - len("wonderful")) <= 1 for e in edits)
    table = synonym_table()
    assert all(word in table[other] for word, others in table.items() for other in others)   # groups are symmetric
    assert "dreadful" in synonyms("awful") and all(s[0].isupper() for s in synonyms("Awful"))


def test_attack_flips_within_budget_and_reports_only_real_flips(classifier, tmp_path):
    model, tokenizer = classifier
    records = read_records(write_sentiment(tmp_path / "s.tsv", 24, seed=5))
    texts, labels = [r["sentence"] for r in records], [int(r["label"]) for r in records]
    labels[0] = 1 - labels[0]          # a text the classifier gets "wrong": the attack must leave it alone
    attack = Attack(model, tokenizer, "both", budget=0.1, seed=3)
    attacked = attack.run(texts, labels)
    assert attacked[0].adversarial == texts[0] and attacked[0].changed == 0 and attacked[0].prediction != labels[0]
    rescored = model.predict([classification_ids(tokenizer, a.adversarial, 64) for a in attacked]).argmax(-1).tolist()
    for a, prediction in zip(attacked, rescored):
        words, adversarial_words = a.text.split(), a.adversarial.split()
        differing = sum(w != v for w, v in zip(words, adversarial_words))
        assert len(words) == len(adversarial_words) and differing == a.changed
        assert a.changed <= max(1, math.ceil(0.1 * len(words)))
        assert a.prediction == prediction
    summary = attack_summary(attacked)
    correct = [a for a in attacked if a.clean_prediction == a.label]
    flipped = [a for a, p in zip(attacked, rescored) if a.clean_prediction == a.label != p]
    assert summary["attack_success_rate"] == len(flipped) / len(correct) > 0
    assert summary["attacked_accuracy"] == sum(p == a.label for a, p in zip(attacked, rescored)) / len(attacked)
    assert [a.adversarial for a in Attack(model, tokenizer, "both", budget=0.1, seed=3).run(texts, labels)] == \
        [a.adversarial for a in attacked]                # seeded: the same attack twice


def test_eval_attack_cli(tiny_classifier, tiny_checkpoint, tmp_path):
    data = write_sentiment(tmp_path / "s.tsv", 30, seed=7)
    out, examples = tmp_path / "r.json", tmp_path / "adv.jsonl"
    proc = run_cli("eval", "--checkpoint", str(tiny_classifier), "--data", str(data), "--attack", "deepwordbug",
                   "--attack-budget", "0.2", "--attack-output", str(examples), "--json", str(out), "--quiet", check=True)
    assert "under attack (deepwordbug" in proc.stdout
    attack = json.loads(out.read_text())["attack"]
    assert attack["clean_accuracy"] == json.loads(out.read_text())["accuracy"]
    assert attack["attacked_accuracy"] <= attack["clean_accuracy"]
    assert len(examples.read_text().splitlines()) == 30
    bad = run_cli("eval", "--checkpoint", str(tiny_classifier), "--data", str(data), "--attack", "textfooler")
    assert bad.returncode != 0 and "invalid choice: 'textfooler'" in bad.stderr
    with pytest.raises(ConfigError, match="attack_budget is a share of the words"):
        evaluate(EvalConfig(str(tiny_classifier), str(data), attack="both", attack_budget=1.5))
    text = tmp_path / "t.txt"
    text.write_text("to be or not to be " * 20)
    with pytest.raises(ConfigError, match="attack needs a checkpoint with a classification head"):
        evaluate(EvalConfig(str(tiny_checkpoint), str(text), attack="both"))

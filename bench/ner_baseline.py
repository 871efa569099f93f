"""Named-entity recognition against a classical baseline: a linear-chain CRF (sklearn-crfsuite) over
the lexical features a tagger's ``word_features`` hash (data/conll.py), trained on WNUT 2017 train
and scored on dev with seqeval (default mode, conlleval's reading) beside a fine-tuned gptstack
tagger scored on the same sentences.

    gptstack finetune --task token_classification --init_from runs/demo/best \\
        --data src/gptstack/assets/wnut17/train.conll --eval_data src/gptstack/assets/wnut17/dev.conll \\
        --word_features 131072 --token_crf true --max_steps 600 --learning_rate 1e-3 \\
        --out_dir runs/ner --best_metric f1_micro
    python bench/ner_baseline.py --checkpoint runs/ner/best

``--hidden-from CHECKPOINT`` adds that tagger's hidden states (the states its head reads, reduced
to ``--hidden-dims`` by PCA fitted on train) to the CRF's features: a CRF over the transformer.
Needs the baselines extra (`pip install 'gptstack[baselines]'`). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import time
from pathlib import Path

import numpy as np
import sklearn_crfsuite
from seqeval.metrics import classification_report

from gptstack.data.conll import read_tagged, word_descriptions
from gptstack.evaluate.tasks import EvalConfig, evaluate

ASSETS = Path(__file__).resolve().parents[1] / "src" / "gptstack" / "assets" / "wnut17"


def sentence_features(tokens: list[str]) -> list[dict]:
    """What the tagger's word features hash (data/conll.py ``word_descriptions``: the word's lower
    case, shape, flags and affixes, fewer of them for two neighbours either side), so the CRF and our
    head read the same lexical evidence."""
    return [{"bias": 1.0, **row} for row in word_descriptions(tokens)]


def hidden_features(checkpoint: str, sentences: list[list[str]], dims: int, pca=None, batch: int = 64):
    """The states the checkpoint's head reads for every word, PCA-reduced to ``dims`` (fitted here
    when ``pca`` is None), as named float features; ``batch`` sentences' windows go through the model
    at a time, as in training (one forward per sentence leaves the CPU's matrix units mostly idle)."""
    import torch
    from sklearn.decomposition import PCA
    from gptstack.checkpoint import load_token_classifier
    from gptstack.heads import pad_windows, tagging_windows
    tagger, tokenizer, _ = load_token_classifier(checkpoint)
    context, block_size = tagger.context, tagger.gpt.config.block_size
    per_sentence = []
    with torch.inference_mode():
        for start in range(0, len(sentences), batch):
            chunk = sentences[start:start + batch]
            windows = [w for words in chunk for w in tagging_windows(tokenizer, words, context, block_size)]
            idx, where, _, counts = pad_windows(windows)
            states = torch.cat([h[:n] for h, n in zip(tagger.hidden(idx, where).float(), counts)])
            per_sentence += states.split([len(words) for words in chunk])
    flat = torch.cat(per_sentence).numpy()
    pca = pca or PCA(dims, random_state=0).fit(flat)
    reduced = pca.transform(flat)
    splits = np.cumsum([len(s) for s in per_sentence])[:-1]
    return [[{f"h{d}": float(v) for d, v in enumerate(row)} for row in part] for part in np.split(reduced, splits)], pca


def scores(gold: list[list[str]], predicted: list[list[str]]) -> dict:
    """seqeval's report (default mode): per type and micro / macro averages."""
    return classification_report(gold, predicted, output_dict=True, zero_division=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", default=str(ASSETS / "train.conll"))
    parser.add_argument("--dev", default=str(ASSETS / "dev.conll"))
    parser.add_argument("--checkpoint", default="", help="a token-classification checkpoint scored beside the CRF")
    parser.add_argument("--hidden-from", default="", help="also give the CRF this checkpoint's hidden states")
    parser.add_argument("--hidden-dims", type=int, default=32)
    parser.add_argument("--c1", type=float, default=0.1, help="the CRF's L1 penalty")
    parser.add_argument("--c2", type=float, default=0.1, help="the CRF's L2 penalty")
    args = parser.parse_args()
    train, dev = read_tagged(args.train), read_tagged(args.dev)
    x_train = [sentence_features(r["tokens"]) for r in train]
    x_dev = [sentence_features(r["tokens"]) for r in dev]
    if args.hidden_from:
        h_train, pca = hidden_features(args.hidden_from, [r["tokens"] for r in train], args.hidden_dims)
        h_dev, _ = hidden_features(args.hidden_from, [r["tokens"] for r in dev], args.hidden_dims, pca)
        x_train = [[{**a, **b} for a, b in zip(s, h)] for s, h in zip(x_train, h_train)]
        x_dev = [[{**a, **b} for a, b in zip(s, h)] for s, h in zip(x_dev, h_dev)]
    started = time.perf_counter()
    crf = sklearn_crfsuite.CRF(algorithm="lbfgs", c1=args.c1, c2=args.c2, max_iterations=200,
                               all_possible_transitions=True)
    crf.fit(x_train, [r["tags"] for r in train])
    seconds = time.perf_counter() - started
    gold = [r["tags"] for r in dev]
    columns = {("CRF + hidden states" if args.hidden_from else "CRF"): scores(gold, crf.predict(x_dev))}
    if args.checkpoint:
        ours = evaluate(EvalConfig(checkpoint=args.checkpoint, data=args.dev, progress=False))
        columns[f"gptstack ({args.checkpoint})"] = scores(gold, ours["predictions"])
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("Model name")),
                 platform.processor())
    print(f"WNUT 2017 dev ({len(dev)} sentences), entity-level F1 (seqeval default mode); CRF trained in "
          f"{seconds:.0f} s on {model}\n")
    names = list(columns)
    print("| entity type | " + " | ".join(f"{n} P / R / F1" for n in names) + " |")
    print("|---|" + "---|" * len(names))
    types = sorted({k for report in columns.values() for k in report if not k.endswith(" avg")})
    for row in [*types, "micro avg", "macro avg"]:
        cells = []
        for name in names:
            m = columns[name].get(row, {"precision": 0.0, "recall": 0.0, "f1-score": 0.0})
            cells.append(f"{m['precision']:.3f} / {m['recall']:.3f} / **{m['f1-score']:.3f}**")
        support = next(int(r[row]["support"]) for r in columns.values() if row in r)
        print(f"| {row} ({support}) | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

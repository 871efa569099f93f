"""The SST-2 recipe against a classical baseline, on the same rows: TF-IDF (word 1-2-grams and
character 2-5-grams) + logistic regression, trained on the recipe's train split, its C picked on
the recipe's val split (as best/ is picked there), both scored on the test split that neither saw.

    python bench/sst2_baseline.py --run runs/sst2        # after `gptstack finetune --config configs/sst2.yaml`

Needs the baselines extra (`pip install 'gptstack[baselines]'`). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
from pathlib import Path

from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score
from sklearn.pipeline import FeatureUnion, make_pipeline

from gptstack.data.records import labelled_texts, read_records
from gptstack.evaluate.tasks import EvalConfig, evaluate

C_GRID = (0.25, 0.5, 1, 2, 4, 8, 16)


def split(run: Path, name: str):
    path = run / "splits" / f"{name}.jsonl"
    if not path.exists():
        raise SystemExit(f"{path} is missing: fine-tune with test_fraction > 0 (configs/sst2.yaml) first")
    return labelled_texts(read_records(path), str(path))


def tfidf_logistic_regression(train, val, test) -> dict:
    """Fit on train for each C, keep the best on val, score test."""
    def model(c: float):
        features = FeatureUnion([
            ("words", TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1)),
            ("chars", TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True, min_df=2))])
        return make_pipeline(features, LogisticRegression(C=c, max_iter=2000)).fit(train.texts, train.labels)
    fitted = {c: model(c) for c in C_GRID}
    best_c = max(C_GRID, key=lambda c: accuracy_score(val.labels, fitted[c].predict(val.texts)))
    predicted = fitted[best_c].predict(test.texts)
    return {"accuracy": accuracy_score(test.labels, predicted),
            "f1_macro": f1_score(test.labels, predicted, average="macro"),
            "val_accuracy": accuracy_score(val.labels, fitted[best_c].predict(val.texts)), "C": best_c}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/sst2", help="the fine-tuning run (its splits/ and best/)")
    parser.add_argument("--checkpoint", default="", help="default: RUN/best")
    args = parser.parse_args()
    run = Path(args.run)
    train, val, test = split(run, "train"), split(run, "val"), split(run, "test")
    baseline = tfidf_logistic_regression(train, val, test)
    checkpoint = args.checkpoint or str(run / "best")
    ours = evaluate(EvalConfig(checkpoint=checkpoint, data=str(run / "splits" / "test.jsonl"), progress=False))
    ours_val = evaluate(EvalConfig(checkpoint=checkpoint, data=str(run / "splits" / "val.jsonl"), progress=False))
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model_name = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("Model name")),
                      platform.processor())
    print(f"SST-2 ({len(train.texts)} train / {len(val.texts)} val / {len(test.texts)} test sentences), {model_name}\n")
    print("| model | test accuracy | test macro F1 | val accuracy |")
    print("|---|---:|---:|---:|")
    print(f"| gptstack {checkpoint} | {ours['accuracy']:.3f} | {ours['f1_macro']:.3f} | {ours_val['accuracy']:.3f} |")
    print(f"| TF-IDF + logistic regression (C={baseline['C']}) | {baseline['accuracy']:.3f} | "
          f"{baseline['f1_macro']:.3f} | {baseline['val_accuracy']:.3f} |")
    summary = {"ours": {k: ours[k] for k in ("accuracy", "f1_macro")}, "baseline": baseline}
    (run / "baseline.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()

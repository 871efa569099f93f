"""Supervised fine-tuning end to end: a synthetic chat task, ROUGE before and after.

Writes 600 one-turn chats ("What is the capital of France?" -> "The capital of France is Paris.",
20 countries, 3 phrasings, a system line), fine-tunes a checkpoint on 540 of them with the loss on the
assistant's words only, and scores greedy answers to the other 60 with ROUGE, before and after.

    python bench/sft.py --checkpoint runs/demo/best [--epochs 12] [--out runs/sft-capitals]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from gptstack.adapt.finetune import FinetuneConfig, finetune
from gptstack.evaluate.tasks import EvalConfig, evaluate

CAPITALS = {"France": "Paris", "Spain": "Madrid", "Italy": "Rome", "Germany": "Berlin", "Portugal": "Lisbon",
            "Austria": "Vienna", "Greece": "Athens", "Poland": "Warsaw", "Norway": "Oslo", "Sweden": "Stockholm",
            "Egypt": "Cairo", "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi", "Peru": "Lima",
            "Chile": "Santiago", "Kenya": "Nairobi", "Ireland": "Dublin", "Denmark": "Copenhagen",
            "Finland": "Helsinki"}
QUESTIONS = ["What is the capital of {c}?", "Name the capital city of {c}.", "Which city is the capital of {c}?"]


def write_chats(out: Path, n: int = 600, seed: int = 0) -> tuple[Path, Path]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        country = rng.choice(list(CAPITALS))
        rows.append({"messages": [
            {"role": "system", "content": "You answer in one short sentence."},
            {"role": "user", "content": rng.choice(QUESTIONS).format(c=country)},
            {"role": "assistant", "content": f"The capital of {country} is {CAPITALS[country]}."}]})
    out.mkdir(parents=True, exist_ok=True)
    train, val = out / "train.jsonl", out / "val.jsonl"
    cut = n * 9 // 10
    train.write_text("".join(json.dumps(r) + "\n" for r in rows[:cut]))
    val.write_text("".join(json.dumps(r) + "\n" for r in rows[cut:]))
    return train, val


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="runs/demo/best")
    parser.add_argument("--out", default="runs/sft-capitals")
    parser.add_argument("--epochs", type=float, default=12)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    args = parser.parse_args()

    out = Path(args.out)
    train, val = write_chats(out / "data")
    scores = {}

    def score(checkpoint: str) -> dict:
        result = evaluate(EvalConfig(checkpoint=checkpoint, data=str(val), max_new_tokens=16, progress=False))
        return {name: result["rouge"][name]["f1"] for name in ("rouge1", "rouge2", "rougeL")} | \
            {"sample": result["samples"][0]["prediction"]}

    scores["before"] = score(args.checkpoint)
    result = finetune(FinetuneConfig(task="sft", init_from=args.checkpoint, data=str(train), eval_data=str(val),
                                     out_dir=str(out / "run"), batch_size=8, max_epochs=args.epochs,
                                     learning_rate=args.learning_rate, eval_interval=50, tensorboard=False))
    scores["after"] = score(str(out / "run" / "best"))
    print(f"\nfine-tuned {result.steps} steps; validation loss on the answers {result.best_val_loss:.3f}\n")
    print("| checkpoint | ROUGE-1 F1 | ROUGE-2 F1 | ROUGE-L F1 | first validation answer |")
    print("|---|---:|---:|---:|---|")
    for name, s in scores.items():
        print(f"| {name} | {s['rouge1']:.3f} | {s['rouge2']:.3f} | {s['rougeL']:.3f} | {s['sample']!r} |")


if __name__ == "__main__":
    main()

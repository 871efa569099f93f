"""Metrics as plain functions of predictions and references, each checked by hand in the tests.

Conventions: the confusion matrix has true labels as rows and predictions as columns; a precision
or recall whose denominator is zero counts as 0 (as scikit-learn's ``zero_division=0``); macro
averages are unweighted means over classes. ROUGE comes from Google's ``rouge-score`` package (the
implementation behind most published numbers), with Porter stemming, averaged over examples.
Entity scores follow seqeval's default mode (tested equal to it).
"""

from __future__ import annotations

import math

from ..data.conll import entity_spans


def classification_metrics(y_true: list[int], y_pred: list[int], labels: list[str]) -> dict:
    """Accuracy, per-class and macro precision / recall / F1, and the confusion matrix."""
    if len(y_true) != len(y_pred):
        raise ValueError(f"{len(y_true)} references but {len(y_pred)} predictions")
    if not y_true:
        raise ValueError("no examples to score")
    k = len(labels)
    matrix = [[0] * k for _ in range(k)]
    for t, p in zip(y_true, y_pred):
        matrix[t][p] += 1
    per_class = {}
    for c, name in enumerate(labels):
        tp = matrix[c][c]
        predicted = sum(matrix[r][c] for r in range(k))
        actual = sum(matrix[c])
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "support": actual}
    macro = {m: sum(c[m] for c in per_class.values()) / k for m in ("precision", "recall", "f1")}
    return {
        "examples": len(y_true),
        "accuracy": sum(matrix[c][c] for c in range(k)) / len(y_true),
        "precision_macro": macro["precision"], "recall_macro": macro["recall"], "f1_macro": macro["f1"],
        "per_class": per_class,
        "labels": list(labels),
        "confusion_matrix": matrix,
    }


def language_model_metrics(nll_sum: float, tokens: int, n_bytes: int | None = None) -> dict:
    """Mean loss (nats per token), perplexity, and bits per byte of the original text when its size is known."""
    if tokens <= 0:
        raise ValueError("no tokens were scored")
    loss = nll_sum / tokens
    result = {"loss": loss, "perplexity": math.exp(min(loss, 700)), "tokens": tokens}
    if n_bytes:
        result["bits_per_byte"] = nll_sum / math.log(2) / n_bytes
        result["bytes"] = n_bytes
    return result


ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def rouge(predictions: list[str], references: list[str]) -> dict:
    """Mean ROUGE-1/2/L precision, recall and F1 over examples."""
    from rouge_score import rouge_scorer
    if len(predictions) != len(references):
        raise ValueError(f"{len(references)} references but {len(predictions)} predictions")
    if not predictions:
        raise ValueError("no examples to score")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = {t: {"precision": 0.0, "recall": 0.0, "f1": 0.0} for t in ROUGE_TYPES}
    for prediction, reference in zip(predictions, references):
        scores = scorer.score(reference, prediction)
        for t in ROUGE_TYPES:
            totals[t]["precision"] += scores[t].precision
            totals[t]["recall"] += scores[t].recall
            totals[t]["f1"] += scores[t].fmeasure
    return {t: {m: v / len(predictions) for m, v in values.items()} for t, values in totals.items()}


def entity_metrics(gold: list[list[str]], predicted: list[list[str]]) -> dict:
    """Entity-level scores of tag sequences, as seqeval's default (conlleval) mode computes them: an
    entity counts as found only with its exact type and boundaries. Per type precision / recall / F1
    / support, micro over all entities, macro as the unweighted mean over the types that occur in
    either the references or the predictions; plus ``confusion_matrix``: over spans whose boundaries
    match, gold type (rows) against predicted type (columns), with a last row and column "(none)"
    for gold entities no prediction has the boundaries of, and predictions no gold entity has."""
    if len(gold) != len(predicted):
        raise ValueError(f"{len(gold)} reference sentences but {len(predicted)} predicted")
    if not gold:
        raise ValueError("no sentences to score")
    true, found = set(), set()
    for i, (g, p) in enumerate(zip(gold, predicted)):
        if len(g) != len(p):
            raise ValueError(f"sentence {i} has {len(g)} reference tags but {len(p)} predicted")
        true |= {(i, *span) for span in entity_spans(g)}
        found |= {(i, *span) for span in entity_spans(p)}
    types = sorted({kind for _, kind, _, _ in true | found})
    per_type = {}
    for kind in types:
        t = {e for e in true if e[1] == kind}
        f = {e for e in found if e[1] == kind}
        per_type[kind] = {**_prf(len(t & f), len(f), len(t)), "support": len(t)}
    micro = _prf(len(true & found), len(found), len(true))
    macro = {m: sum(c[m] for c in per_type.values()) / len(types) if types else 0.0 for m in ("precision", "recall", "f1")}
    labels = [*types, "(none)"]
    index = {kind: i for i, kind in enumerate(labels)}
    matrix = [[0] * len(labels) for _ in labels]
    by_bounds = {(i, start, end): kind for i, kind, start, end in found}
    matched = set()
    for i, kind, start, end in true:
        guess = by_bounds.get((i, start, end))
        matrix[index[kind]][index[guess or "(none)"]] += 1
        matched.add((i, start, end))
    for (i, start, end), kind in by_bounds.items():
        if (i, start, end) not in matched:
            matrix[-1][index[kind]] += 1
    return {"sentences": len(gold), "entities": len(true), "predicted_entities": len(found),
            "precision_micro": micro["precision"], "recall_micro": micro["recall"], "f1_micro": micro["f1"],
            "precision_macro": macro["precision"], "recall_macro": macro["recall"], "f1_macro": macro["f1"],
            "per_class": per_type, "labels": labels, "confusion_matrix": matrix}


def _prf(correct: int, predicted: int, actual: int) -> dict:
    precision = correct / predicted if predicted else 0.0
    recall = correct / actual if actual else 0.0
    return {"precision": precision, "recall": recall,
            "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0}

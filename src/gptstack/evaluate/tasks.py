"""``evaluate(EvalConfig)``: score a checkpoint on a file, as `gptstack eval` does.

Three tasks, picked from the data unless named:

* ``lm``: loss, perplexity and bits per byte of a text file or a prepared dataset's val split. Texts
  longer than the context are scored with a sliding window: each window moves ``stride`` tokens
  and scores only the tokens not scored before, so every token is predicted once, with at least
  ``block_size - stride`` tokens of context (all of them in the first window).
* ``classification``: a checkpoint with a classification head on a labelled .tsv/.csv/.jsonl.
* ``token_classification``: a checkpoint with a token-classification head on tagged sentences
  (CoNLL or JSONL): entity-level precision / recall / F1 per type, micro and macro (seqeval's
  default mode), and a confusion of entity types over spans whose boundaries match.
* ``generation``: greedy completions of prompts (prompt/response records or chats, the last
  assistant message being the reference), scored with ROUGE-1/2/L.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..chat import DEFAULT_CHAT_STOPS
from ..checkpoint import load_classifier, load_model, load_token_classifier, verify
from ..config import ConfigError, require
from ..data.conll import read_tagged
from ..data.loader import TokenDataset
from ..data.prepare import MANIFEST, DataError
from ..data.records import IGNORE_INDEX, labelled_texts, read_records, sft_segments
from ..heads import classification_ids, tagging_windows
from ..inference.engine import Engine, EngineConfig
from ..inference.sampling import SamplingParams
from ..runtime import autocast, resolve_device, resolve_dtype
from .attack import ATTACKS, Attack, attack_summary, write_attacked
from .metrics import classification_metrics, entity_metrics, language_model_metrics, rouge

TASKS = ("auto", "lm", "classification", "token_classification", "generation")


@dataclass
class EvalConfig:
    checkpoint: str = ""
    data: str = ""
    task: str = "auto"
    stride: int = 0                 # lm: tokens a window moves (0 = half the context)
    max_tokens: int = 0             # lm: score at most this many tokens (0 = all)
    batch_size: int = 16
    text_field: str = ""            # classification: "" = first of text / sentence / input / document
    label_field: str = "label"
    max_new_tokens: int = 64        # generation
    attack: str = "none"            # classification: also attack each text: deepwordbug | synonym | both (evaluate/attack.py)
    attack_budget: float = 0.1      # attack: share of a text's words it may change (rounded up, at least one)
    attack_candidates: int = 20     # attack: character edits tried per word
    attack_seed: int = 0
    attack_output: str = ""         # attack: write every text and its adversarial version to this .jsonl
    device: str = "auto"
    dtype: str = "auto"
    progress: bool = True

    def validate(self) -> "EvalConfig":
        require(bool(self.checkpoint), "checkpoint is required")
        require(bool(self.data), "data is required: a text file, a prepared dataset or a labelled .tsv/.csv/.jsonl")
        require(self.task in TASKS, f"task must be one of {TASKS}, got {self.task!r}")
        for name in ("stride", "max_tokens"):
            require(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("batch_size", "max_new_tokens", "attack_candidates"):
            require(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        require(self.attack in ATTACKS, f"attack must be one of {ATTACKS}, got {self.attack!r}")
        require(0 < self.attack_budget <= 1, f"attack_budget is a share of the words, in (0, 1], got {self.attack_budget}")
        require(self.task in ("auto", "classification") or self.attack == "none",
                f"attack is for task classification, got task {self.task!r}")
        return self


def pick_task(cfg: EvalConfig, head: dict | None) -> str:
    """The task the data and the checkpoint's head (config.json["head"]) call for when none is named.
    A token-classification head takes any file (CoNLL files have no one suffix)."""
    if cfg.task != "auto":
        return cfg.task
    path = Path(cfg.data)
    if head and head.get("kind") == "token_classification" and not (path / MANIFEST).exists():
        return "token_classification"
    if (path / MANIFEST).exists() or path.suffix.lower() not in (".tsv", ".csv", ".jsonl"):
        return "lm"
    if head:
        return "classification"
    first = read_records(path)[:1]
    if first and ("messages" in first[0] or "response" in first[0] or "completion" in first[0]):
        return "generation"
    return "lm"


def evaluate(cfg: EvalConfig) -> dict:
    cfg.validate()
    config = verify(cfg.checkpoint)
    task = pick_task(cfg, config.get("head"))
    if cfg.attack != "none" and task != "classification":
        raise ConfigError(f"attack needs a checkpoint with a classification head and a labelled .tsv/.csv/.jsonl; "
                          f"{cfg.checkpoint} on {cfg.data} is a {task} evaluation")
    device = resolve_device(cfg.device)
    result = {"task": task, "checkpoint": str(cfg.checkpoint), "data": str(cfg.data)}
    if task == "generation":
        return {**result, **_generation(cfg, device)}
    # scoring whole windows under autocast is shaped like training's forward pass, not like decoding
    dtype = resolve_dtype(cfg.dtype, device, workload="train")
    if task == "classification":
        return {**result, **_classification(cfg, device, dtype)}
    if task == "token_classification":
        return {**result, **_token_classification(cfg, device, dtype)}
    return {**result, **_language_model(cfg, device, dtype)}


# --- language modelling ------------------------------------------------------------------------

def _lm_tokens(cfg: EvalConfig, tokenizer) -> tuple[np.ndarray, int]:
    """The tokens to score and the UTF-8 size of the text they encode."""
    path = Path(cfg.data)
    if (path / MANIFEST).exists():
        dataset = TokenDataset(path, "val")
        tokens = np.concatenate([np.asarray(s) for s in dataset.shards]).astype(np.int64)
        if cfg.max_tokens:
            tokens = tokens[:cfg.max_tokens]
        return tokens, len(tokenizer.decode(tokens.tolist()).encode("utf-8"))
    if path.is_dir():
        raise DataError(f"{path} is a folder but not a prepared dataset; give a text file or run `gptstack prepare`")
    if not path.is_file():
        raise DataError(f"data {path} does not exist")
    text = path.read_text(encoding="utf-8")
    tokens = np.array(tokenizer.encode(text), dtype=np.int64)
    if cfg.max_tokens and len(tokens) > cfg.max_tokens:
        tokens = tokens[:cfg.max_tokens]
        text = tokenizer.decode(tokens.tolist())
    return tokens, len(text.encode("utf-8"))


def sliding_windows(n_tokens: int, block_size: int, stride: int) -> list[tuple[int, int]]:
    """(start, first scored position) of each window over ``n_tokens`` tokens: window w predicts
    tokens start+1 .. start+block_size, and scores those from its first scored position on."""
    if n_tokens < 2:
        raise DataError("the text has fewer than two tokens; nothing to predict")
    windows, scored_to = [], 1       # token 0 has no context and is never predicted
    start = 0
    while scored_to < n_tokens:
        end = min(start + block_size, n_tokens - 1)
        windows.append((start, scored_to))
        scored_to = end + 1
        start = min(start + stride, max(0, n_tokens - 1 - block_size)) if scored_to < n_tokens else start
    return windows


def _language_model(cfg: EvalConfig, device, dtype) -> dict:
    model, tokenizer, _ = load_model(cfg.checkpoint, device=device)
    block = model.config.block_size
    stride = cfg.stride or max(1, block // 2)
    require(stride <= block, f"stride {stride} is longer than the context of {block} tokens")
    tokens, n_bytes = _lm_tokens(cfg, tokenizer)
    windows = sliding_windows(len(tokens), block, stride)
    nll, count = 0.0, 0
    bar = tqdm(total=len(windows), desc="scoring", unit="window", disable=not cfg.progress, dynamic_ncols=True)
    with torch.inference_mode():
        for b in range(0, len(windows), cfg.batch_size):
            batch = windows[b:b + cfg.batch_size]
            length = min(block, len(tokens) - 1 - min(s for s, _ in batch))
            x = torch.zeros(len(batch), length, dtype=torch.long)
            y = torch.full((len(batch), length), IGNORE_INDEX, dtype=torch.long)
            for row, (start, first) in enumerate(batch):
                span = tokens[start:start + length + 1]
                x[row, :len(span) - 1] = torch.from_numpy(span[:-1])
                targets = torch.from_numpy(span[1:].copy())
                targets[:first - start - 1] = IGNORE_INDEX    # already scored by an earlier window
                y[row, :len(targets)] = targets
            n = int((y != IGNORE_INDEX).sum())
            with autocast(device, dtype):
                _, loss = model(x.to(device), y.to(device))
            nll += loss.float().item() * n
            count += n
            bar.update(len(batch))
    bar.close()
    return {**language_model_metrics(nll, count, n_bytes), "stride": stride, "context": block}


# --- classification -----------------------------------------------------------------------------

def _classification(cfg: EvalConfig, device, dtype) -> dict:
    classifier, tokenizer, _ = load_classifier(cfg.checkpoint, device=device)
    data = labelled_texts(read_records(cfg.data), cfg.data, cfg.text_field, cfg.label_field)
    unknown = sorted(set(data.labels) - set(classifier.labels))
    if unknown:
        raise DataError(f"{cfg.data} has labels {unknown} that the classifier does not know ({classifier.labels})")
    block = classifier.gpt.config.block_size
    ids = [classification_ids(tokenizer, text, block) for text in data.texts]
    with autocast(device, dtype):
        probs = classifier.predict(ids, cfg.batch_size)
    predictions = probs.argmax(-1).tolist()
    index = {label: i for i, label in enumerate(classifier.labels)}
    labels = [index[label] for label in data.labels]
    metrics = classification_metrics(labels, predictions, classifier.labels)
    if cfg.attack == "none":
        return metrics
    attack = Attack(classifier, tokenizer, cfg.attack, cfg.attack_budget, cfg.attack_candidates, cfg.attack_seed,
                    cfg.batch_size)
    with autocast(device, dtype):
        attacked = attack.run(data.texts, labels, cfg.progress)
    if cfg.attack_output:
        write_attacked(attacked, classifier.labels, cfg.attack_output)
    return {**metrics, "attack": {"kind": cfg.attack, "budget": cfg.attack_budget, **attack_summary(attacked)}}


# --- token classification ------------------------------------------------------------------------

def _token_classification(cfg: EvalConfig, device, dtype) -> dict:
    tagger, tokenizer, _ = load_token_classifier(cfg.checkpoint, device=device)
    records = read_tagged(cfg.data)
    unknown = sorted({t for r in records for t in r["tags"]} - set(tagger.labels))
    if unknown:
        raise DataError(f"{cfg.data} has tags {unknown} that the tagger does not know ({tagger.labels})")
    block = tagger.gpt.config.block_size
    sentences = [tagging_windows(tokenizer, r["tokens"], tagger.context, block) for r in records]
    with autocast(device, dtype):
        tagged = tagger.tag(sentences, cfg.batch_size)
    predicted = [[tagger.labels[i] for i in path] for path, _ in tagged]
    return {**entity_metrics([r["tags"] for r in records], predicted), "predictions": predicted}


# --- generation ----------------------------------------------------------------------------------

def generation_pairs(records: list[dict], source: str) -> tuple[list[str], list[str]]:
    """(prompt, reference) for each record: the text before the last response piece, and that piece."""
    prompts, references = [], []
    for i, record in enumerate(records):
        segments = sft_segments(record, source, i)
        last = max(j for j, (_, is_response) in enumerate(segments) if is_response)
        prompts.append("".join(text for text, _ in segments[:last]))
        references.append(segments[last][0].strip())
    return prompts, references


def _generation(cfg: EvalConfig, device) -> dict:
    model, tokenizer, _ = load_model(cfg.checkpoint, device=device)
    prompts, references = generation_pairs(read_records(cfg.data), cfg.data)
    if not prompts:
        raise DataError(f"{cfg.data} holds no records")
    block = model.config.block_size
    room = block - cfg.max_new_tokens
    if room < 1:
        raise ConfigError(f"max_new_tokens {cfg.max_new_tokens} leaves no room for a prompt in the context of {block}")
    prompt_ids = [tokenizer.encode(p)[-room:] for p in prompts]    # long prompts keep their end
    engine = Engine(model, tokenizer, EngineConfig(max_batch_size=cfg.batch_size, max_queue=len(prompts)), device)
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=0.0, stop=list(DEFAULT_CHAT_STOPS))
    completions = engine.generate(prompt_ids, params)
    predictions = [c.text.strip() for c in completions]
    return {"examples": len(prompts), "rouge": rouge(predictions, references),
            "samples": [{"prompt": p[-300:], "reference": r, "prediction": c}
                        for p, r, c in list(zip(prompts, references, predictions))[:5]]}

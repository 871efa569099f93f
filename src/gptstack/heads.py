"""Task heads on top of the GPT's hidden states, and embeddings from them.

``SequenceClassifier``: as in GPT-1's fine-tuning (Radford et al. 2018), a linear layer on the
final hidden state of the last real token of each sequence, after ``clf_pdrop`` dropout. Under
causal attention that token has seen the whole input, and right padding after it changes nothing,
so batches are padded on the right with no attention mask. Every text ends with an end-of-text
token, so the head always reads the same kind of token (GPT-1's "extract" token).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .model import GPT
from .tokenizer import Tokenizer


def classification_ids(tokenizer: Tokenizer, text: str, max_tokens: int) -> list[int]:
    """The tokens a classifier reads for ``text``: its first ``max_tokens - 1`` tokens and end-of-text."""
    return tokenizer.encode(text)[:max_tokens - 1] + [tokenizer.eot_id]


class SequenceClassifier(nn.Module):
    def __init__(self, gpt: GPT, labels: list[str]):
        super().__init__()
        if len(labels) < 2:
            raise ValueError(f"a classifier needs at least two labels, got {labels}")
        self.gpt, self.labels = gpt, list(labels)
        self.dropout = nn.Dropout(gpt.config.clf_pdrop)
        self.head = nn.Linear(gpt.config.n_embd, len(labels))
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Logits [B, num_labels] for right-padded ``idx`` [B, T] whose row i has ``lengths[i]`` real tokens."""
        hidden = self.gpt.hidden_states(idx)
        last = hidden[torch.arange(idx.shape[0], device=idx.device), lengths - 1]
        return self.head(self.dropout(last))

    def head_state(self) -> dict[str, torch.Tensor]:
        """The head's weights under the names a checkpoint stores them by."""
        return {f"classifier.{k}": v for k, v in self.head.state_dict().items()}

    def load_head_state(self, state: dict[str, torch.Tensor]) -> None:
        self.head.load_state_dict({k[len("classifier."):]: v for k, v in state.items() if k.startswith("classifier.")})

    @torch.inference_mode()
    def predict(self, token_lists: list[list[int]], batch_size: int = 32) -> torch.Tensor:
        """Class probabilities [N, num_labels] for token lists made by :func:`classification_ids`."""
        self.eval()
        device = self.head.weight.device
        probs = []
        for start in range(0, len(token_lists), batch_size):
            idx, lengths = pad_right(token_lists[start:start + batch_size], device)
            probs.append(torch.softmax(self(idx, lengths).float(), dim=-1))
        return torch.cat(probs) if probs else torch.empty(0, len(self.labels))


@torch.inference_mode()
def mean_pooled_embeddings(gpt: GPT, token_lists: list[list[int]], batch_size: int = 16) -> torch.Tensor:
    """[N, n_embd] fp32 embeddings: each sequence's final hidden states averaged over its tokens, then
    scaled to unit length (so a dot product is the cosine similarity). Sequences are right-padded
    in batches; under causal attention the padding changes no real token's state."""
    out = []
    for start in range(0, len(token_lists), batch_size):
        idx, lengths = pad_right(token_lists[start:start + batch_size], gpt.transformer.wte.weight.device)
        hidden = gpt.hidden_states(idx).float()
        real = (torch.arange(idx.shape[1], device=idx.device) < lengths[:, None]).unsqueeze(-1)
        pooled = (hidden * real).sum(dim=1) / lengths[:, None]
        out.append(torch.nn.functional.normalize(pooled, dim=-1).cpu())
    return torch.cat(out) if out else torch.empty(0, gpt.config.n_embd)


# one token of a scored text: (token id, its log probability given the tokens before it, the most
# likely tokens there as (id, log probability)); the first token has no logprob and no alternatives
ScoredToken = tuple[int, float | None, list[tuple[int, float]] | None]


@torch.inference_mode()
def prompt_logprobs(gpt: GPT, token_lists: list[list[int]], top: int = 0, rows: int = 256) -> list[list[ScoredToken]]:
    """Every token of each sequence scored by the model: what OpenAI's ``echo`` with ``logprobs``
    returns for the prompt, and how evaluation harnesses score a text (``max_tokens: 0``). The LM
    head runs on ``rows`` positions at a time, so a long text never holds all its logits at once."""
    device = gpt.transformer.wte.weight.device
    scored = []
    for ids in token_lists:
        hidden = gpt.hidden_states(torch.tensor([ids], device=device))[0]
        entries: list[ScoredToken] = [(ids[0], None, None)]
        for start in range(0, len(ids) - 1, rows):     # position p predicts token p + 1
            stop = min(start + rows, len(ids) - 1)
            logp = torch.log_softmax(gpt.lm_head(hidden[start:stop]).float(), dim=-1).cpu()
            targets = torch.tensor(ids[start + 1:stop + 1])
            chosen = logp.gather(1, targets[:, None])[:, 0].tolist()
            best = logp.topk(top, dim=-1) if top else None
            for i, target in enumerate(targets.tolist()):
                alternatives = list(zip(best.indices[i].tolist(), best.values[i].tolist())) if best is not None else []
                entries.append((target, chosen[i], alternatives))
        scored.append(entries)
    return scored


def pad_right(token_lists: list[list[int]], device: torch.device | str = "cpu",
              pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A [B, longest] batch padded on the right, and each row's real length."""
    if any(len(ids) == 0 for ids in token_lists):
        raise ValueError("cannot classify an empty text; give at least one token")
    lengths = torch.tensor([len(ids) for ids in token_lists])
    idx = torch.full((len(token_lists), int(lengths.max())), pad_id, dtype=torch.long)
    for row, ids in enumerate(token_lists):
        idx[row, :len(ids)] = torch.tensor(ids)
    return idx.to(device), lengths.to(device)

"""Adversarial training of a classifier on its token embeddings (fine-tune ``adversarial: fgm|pgd``).

Text is discrete, so the perturbation is made where the input becomes continuous: an offset added
to the token embeddings, bounded in L2 norm by ``epsilon`` for each sequence as a whole (all of
its real tokens together, as in Miyato et al. 2017). FGM takes one step of length epsilon along the
loss's gradient; PGD (Madry et al. 2018) takes ``steps`` normalised steps of 2.5 * epsilon / steps
from zero, each projected back into the ball. Training then minimises the clean loss plus
``weight`` times the loss at the perturbed embeddings, so the classifier learns to keep its
answer in a neighbourhood of each training text, the neighbourhood that character edits and
synonyms move a text into.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch

from ..model import GPT

METHODS = ("none", "fgm", "pgd")


@contextmanager
def embedding_offset(gpt: GPT, offset: torch.Tensor) -> Iterator[None]:
    """Inside the block, ``gpt``'s token embeddings of a [B, T] input come out plus ``offset`` [B, T, C]."""
    hook = gpt.transformer.wte.register_forward_hook(lambda module, inputs, output: output + offset.to(output.dtype))
    try:
        yield
    finally:
        hook.remove()


def per_sequence_norm(t: torch.Tensor) -> torch.Tensor:
    """The L2 norm of each sequence's [T, C] slice of ``t`` [B, T, C], shaped [B, 1, 1] to divide by."""
    return t.flatten(1).norm(dim=1).clamp_min(1e-12)[:, None, None]


def project(offset: torch.Tensor, epsilon: float) -> torch.Tensor:
    """``offset`` scaled back into the L2 ball of radius ``epsilon``, each sequence on its own."""
    return offset * (epsilon / per_sequence_norm(offset)).clamp(max=1.0)


def perturbation(loss_at: Callable[[torch.Tensor], torch.Tensor], shape: torch.Size, real: torch.Tensor,
                 epsilon: float, steps: int) -> torch.Tensor:
    """The offset, within ``epsilon`` per sequence and zero at padding (``real`` [B, T] is False
    there), that gradient ascent finds to raise ``loss_at(offset)``: one step of length epsilon
    with ``steps`` 1 (FGM), else ``steps`` steps of 2.5 * epsilon / steps (PGD)."""
    step = epsilon if steps == 1 else 2.5 * epsilon / steps
    offset = torch.zeros(shape, device=real.device, requires_grad=True)
    for _ in range(steps):
        grad, = torch.autograd.grad(loss_at(offset), offset)
        grad = grad * real.unsqueeze(-1)
        offset = project(offset.detach() + step * grad / per_sequence_norm(grad), epsilon).requires_grad_()
    return offset.detach()


def adversarial_loss(gpt: GPT, loss_at_embeddings: Callable[[], torch.Tensor], idx: torch.Tensor,
                     real: torch.Tensor, epsilon: float, steps: int) -> torch.Tensor:
    """The loss ``loss_at_embeddings()`` (a forward pass through ``gpt`` on ``idx``) with the token
    embeddings moved by the :func:`perturbation` that raises it."""
    def loss_at(offset: torch.Tensor) -> torch.Tensor:
        with embedding_offset(gpt, offset):
            return loss_at_embeddings()
    shape = (*idx.shape, gpt.config.n_embd)
    return loss_at(perturbation(loss_at, shape, real, epsilon, steps))

"""Cross-entropy fused with the LM head, computed in row chunks.

With a 50,257-token vocabulary the logits of a batch are the largest tensor in training
(batch * context * vocab floats), and PyTorch's log-softmax backward over them dominated the CPU
step (measured: ~27% of the step for the demo model). Here each chunk of rows computes its logits,
its loss and straight away the gradient with respect to those logits (softmax - target), then
drops them. Only the gradients for the hidden states and the head's weight are kept for backward.
"""

from __future__ import annotations

import torch

CHUNK_ROWS = 256


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, label_smoothing, compute_dtype, need_grad):
        rows = hidden.shape[0]
        valid = targets != -100
        n_valid = valid.sum().clamp(min=1)
        w = weight.to(compute_dtype)
        acc = torch.promote_types(compute_dtype, torch.float32)   # softmax and sums: fp32 at least
        if need_grad:
            grad_hidden = torch.empty_like(hidden)
            grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device)
        loss = torch.zeros((), dtype=acc, device=hidden.device)
        vocab = weight.shape[0]
        for start in range(0, rows, CHUNK_ROWS):
            h = hidden[start:start + CHUNK_ROWS].to(compute_dtype)
            t = targets[start:start + CHUNK_ROWS]
            ok = valid[start:start + CHUNK_ROWS]
            logits = (h @ w.T).to(acc)
            safe_t = t.clamp(min=0)[:, None]
            target_logit = logits.gather(1, safe_t).squeeze(1)
            mean_logit = logits.mean(dim=-1) if label_smoothing > 0 else None
            # In place from here on: logits become exp(logits - max), then the softmax.
            row_max = logits.amax(dim=-1, keepdim=True)
            probs = logits.sub_(row_max).exp_()
            sum_exp = probs.sum(dim=-1, keepdim=True)
            lse = (sum_exp.log() + row_max).squeeze(1)
            nll = lse - target_logit
            if label_smoothing > 0:
                nll = (1 - label_smoothing) * nll + label_smoothing * (lse - mean_logit)
            loss += (nll * ok).sum()
            if not need_grad:
                continue
            # d loss / d logits = softmax - (1 - eps) * onehot - eps / V, zero on ignored rows.
            grad = probs.div_(sum_exp)
            if label_smoothing > 0:
                grad.sub_(label_smoothing / vocab)
            grad.scatter_add_(1, safe_t, torch.full_like(sum_exp, -(1 - label_smoothing)))
            grad.mul_((ok.to(acc) / n_valid)[:, None])
            grad = grad.to(compute_dtype)
            grad_hidden[start:start + CHUNK_ROWS] = (grad @ w).to(hidden.dtype)
            grad_weight += (grad.T @ h).to(acc)
        if need_grad:
            ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        return loss / n_valid

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss, grad_weight * grad_loss, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight.T`` against ``targets`` (-100 = ignore).

    Equal to ``F.cross_entropy(hidden @ weight.T, targets, label_smoothing=...)``; matmuls run
    in the autocast dtype when autocast is on, softmax always in fp32.
    """
    device_type = hidden.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
    flat = hidden.reshape(-1, hidden.shape[-1])
    # Decided here: inside Function.forward grad mode is always off and needs_input_grad
    # ignores torch.no_grad(), so evaluation would pay for gradients it never uses.
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    with torch.autocast(device_type, enabled=False):
        return _LinearCrossEntropy.apply(flat, weight, targets.reshape(-1), float(label_smoothing), dtype, need_grad)

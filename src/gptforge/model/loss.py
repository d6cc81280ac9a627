"""Next-token cross-entropy that never materialises fp32 log-probabilities of the full logits.

`F.cross_entropy` on (tokens x vocab) logits writes a log-softmax tensor as large as the logits (in fp32
under autocast, after an fp32 copy of bf16 logits), then a zero-filled gradient and a softmax gradient of
that size again; with GPT-2's 50,257-token vocabulary, writing those fresh tensors costs as much as the LM
head's matmuls on a CPU. Here the logits are taken a few rows at a time: each chunk is upcast to fp32 while
it is in cache, the forward keeps one number per row (the target's log-probability) and the backward
rebuilds softmax - one_hot chunk by chunk, writing the gradient once, in the logits' dtype. The arithmetic
is fp32 throughout, as in `F.cross_entropy`, so values and gradients match it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

IGNORE_INDEX = -100
CHUNK_ELEMENTS_PER_THREAD = 2**19  # CPU: 2 MiB of fp32 logits per thread, in cache (fastest measured)
CHUNK_ELEMENTS_GPU = 2**26  # GPU: memory-bound anyway; big chunks keep kernel launches few


def _rows_per_chunk(logits: Tensor) -> int:
    elements = CHUNK_ELEMENTS_GPU if logits.is_cuda else CHUNK_ELEMENTS_PER_THREAD * torch.get_num_threads()
    return max(1, elements // logits.size(1))


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor) -> Tensor:  # logits (N, V), targets (N,)
        acc = torch.promote_types(logits.dtype, torch.float32)  # fp32 (fp64 under gradcheck)
        step = _rows_per_chunk(logits)
        valid = targets != IGNORE_INDEX
        safe_targets = targets.masked_fill(~valid, 0)
        nll = torch.empty(logits.size(0), dtype=acc, device=logits.device)
        for i in range(0, logits.size(0), step):
            rows = slice(i, i + step)
            log_probs = torch.log_softmax(logits[rows].to(acc), dim=-1)
            nll[rows] = -log_probs.gather(1, safe_targets[rows, None]).squeeze(1)
        n_valid = valid.sum()
        ctx.save_for_backward(logits, safe_targets, valid, n_valid)
        return torch.where(valid, nll, 0.0).sum() / n_valid

    @staticmethod
    def backward(ctx, grad_loss: Tensor) -> tuple[Tensor, None]:
        logits, safe_targets, valid, n_valid = ctx.saved_tensors
        acc = torch.promote_types(logits.dtype, torch.float32)
        step = _rows_per_chunk(logits)
        row_weight = (grad_loss / n_valid) * valid  # d loss / d (row's loss)
        grad = torch.empty_like(logits)
        for i in range(0, logits.size(0), step):
            rows = slice(i, i + step)
            probs = torch.softmax(logits[rows].to(acc), dim=-1)
            probs.scatter_add_(1, safe_targets[rows, None], probs.new_full((probs.size(0), 1), -1.0))
            grad[rows] = probs.mul_(row_weight[rows, None])  # (softmax - one_hot) * weight
        return grad, None


def chunked_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy of (N, V) logits against (N,) targets, ignoring targets == -100; the same value
    and gradient as `F.cross_entropy(logits.float(), targets)`."""
    return _ChunkedCrossEntropy.apply(logits, targets)


class LMLoss(nn.Module):
    """`criterion(logits (B, T, V), targets (B, T))` -> mean next-token loss over targets != -100.

    The model calls its loss through this module so that tensor parallelism can swap in a vocab-parallel
    version taking the same arguments (V then being the local shard of the vocabulary).
    """

    ignore_index = IGNORE_INDEX

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        return chunked_cross_entropy(logits.flatten(0, -2), targets.flatten())

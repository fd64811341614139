"""Distillation losses over the teacher's top-k next-token distribution.

KD objective per token (METHOD.md, stage II): ``ce_weight * CE(next token) + kl_weight * KL(teacher || student)``.

The KL is computed on the teacher's top-k set plus one *tail bucket* (everything outside the top-k),
without renormalisation and at temperature 1:

    KL = sum_{i in topk} p_i (log p_i - log q_i) + p_tail (log p_tail - log q_tail)

with p the teacher's full-vocabulary probabilities of its top-k tokens (p_tail = 1 - sum p_i) and q the
student's full-vocabulary softmax. This is the exact KL between the two distributions coarse-grained to
k + 1 outcomes, so it is >= 0, zero iff the student matches the teacher on the top-k, and it still
penalises a student that moves mass outside the teacher's top-k (renormalising both sides over the top-k
would not). With k = 256 the teacher's tail mass is typically < 1%.

Logits are processed in row chunks so that a full-vocabulary fp32 copy of all logits is never formed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["KDLoss", "topk_logprobs", "kd_loss"]


@dataclass
class KDLoss:
    """Loss terms of one batch (means over supervised tokens; all zero when there are none)."""

    loss: Tensor
    ce: Tensor
    kl: Tensor
    tokens: Tensor  # supervised positions, 0-dim int64 on the logits' device (``int()`` it to read it)


def topk_logprobs(logits: Tensor, k: int, chunk_bytes: int = 256 << 20) -> tuple[Tensor, Tensor]:
    """Teacher top-k ids (..., k) int32 and their full-vocabulary log-probabilities (..., k) fp32, best first.

    Args:
        logits: (..., V) logits in any float dtype.
        k: tokens kept per position.
        chunk_bytes: at most this many bytes of fp32 logits exist at once: the rows go through in slices
            (one 4096-token row block at a 128k vocabulary is 2 GiB in fp32; the 8B stage II on one 80 GB
            card ran out of memory on exactly that allocation).
    """
    *lead, vocab = logits.shape
    rows = logits.reshape(-1, vocab)
    step = max(1, chunk_bytes // (4 * vocab))
    ids = torch.empty(rows.shape[0], k, dtype=torch.int32, device=logits.device)
    lps = torch.empty(rows.shape[0], k, dtype=torch.float32, device=logits.device)
    for start in range(0, rows.shape[0], step):
        part = rows[start : start + step].float()
        values, index = part.topk(k, dim=-1)  # the top-k of the logits are the top-k of the log-probs
        lps[start : start + step] = values - torch.logsumexp(part, dim=-1, keepdim=True)
        ids[start : start + step] = index
    return ids.reshape(*lead, k), lps.reshape(*lead, k)


def _chunk_terms(logits: Tensor, labels: Tensor, t_ids: Tensor | None, t_lp: Tensor | None):
    dtype = torch.promote_types(logits.dtype, torch.float32)  # at least fp32 for the softmax
    logq = logits.to(dtype).log_softmax(-1)  # (n, V)
    ce = F.nll_loss(logq, labels.clamp_min(0), reduction="none")
    if t_ids is None:
        return ce, torch.zeros_like(ce)
    t_lp = t_lp.to(dtype)
    s_lp = logq.gather(-1, t_ids.long())  # student log q on the teacher's top-k
    p = t_lp.exp()
    # tail bucket: log(1 - sum) computed stably; clamp guards rounding when the top-k holds ~all mass
    p_tail = (1 - p.sum(-1)).clamp_min(0)
    log_p_tail = torch.log1p(-p.sum(-1).clamp_max(1 - 1e-6))
    log_q_tail = torch.log1p(-s_lp.exp().sum(-1).clamp_max(1 - 1e-6))
    kl = (p * (t_lp - s_lp)).sum(-1) + p_tail * (log_p_tail - log_q_tail)
    return ce, kl


def kd_loss(
    logits: Tensor,  # (B, S, V) student logits
    labels: Tensor,  # (B, S) next-token ids, -100 where there is none
    topk_ids: Tensor | None = None,  # (B, S, k) teacher top-k ids
    topk_lp: Tensor | None = None,  # (B, S, k) teacher full-vocabulary log-probs of those ids
    ce_weight: float = 0.9,
    kl_weight: float = 0.1,
    chunk_rows: int = 2048,
) -> KDLoss:
    """Mean over supervised positions of ``ce_weight * CE + kl_weight * KL_topk`` (see module docstring).

    Unsupervised positions (label -100) are weighted by zero rather than selected out: selecting needs their
    count on the host, a device-to-host sync in every training step, and copies all logits."""
    V = logits.shape[-1]
    flat_logits, flat_labels = logits.reshape(-1, V), labels.reshape(-1)
    t_ids = topk_ids.reshape(-1, topk_ids.shape[-1]) if topk_ids is not None else None
    t_lp = topk_lp.reshape(-1, topk_lp.shape[-1]) if topk_lp is not None else None
    keep = flat_labels >= 0
    ce_sum = kl_sum = 0.0
    for start in range(0, flat_labels.numel(), chunk_rows):
        sl = slice(start, start + chunk_rows)
        ce, kl = _chunk_terms(flat_logits[sl], flat_labels[sl], None if t_ids is None else t_ids[sl],
                              None if t_lp is None else t_lp[sl])
        # where(), not a product: a zero weight would still let a non-finite ignored row through as NaN
        ce_sum = ce_sum + torch.where(keep[sl], ce, 0.0).sum()
        kl_sum = kl_sum + torch.where(keep[sl], kl, 0.0).sum()
    n = keep.sum()
    ce_mean, kl_mean = ce_sum / n.clamp_min(1), kl_sum / n.clamp_min(1)
    return KDLoss(ce_weight * ce_mean + kl_weight * kl_mean, ce_mean.detach(), kl_mean.detach(), n)

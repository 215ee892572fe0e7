"""Answer-token cross-entropy and distillation divergences for pruned students.

Once the pruner drops tokens, the student's logits no longer line up with ``labels``: output
position ``j`` of sample ``b`` is original position ``kept_index[b, j]`` and predicts the token
after it. :func:`answer_targets` maps labels through ``kept_index``; the (unpruned) teacher's
logits are gathered at the same original positions, so both sides predict the same token.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100

__all__ = [
    "IGNORE_INDEX",
    "answer_targets",
    "answer_ce",
    "divergence",
    "distill_rows",
    "distill_loss",
    "gather_rows",
]


def answer_targets(labels: torch.Tensor, kept_index: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token targets for each output position; IGNORE_INDEX where there is none.

    labels: (B, T) unshifted (``labels[b, t] = input_ids[b, t]`` on answer tokens, else -100).
    kept_index: (B, T_out) original index of each output position, -1 = padding; None = no pruning.
    Returns (B, T_out) long.
    """
    B, T = labels.shape
    if kept_index is None:
        kept_index = torch.arange(T, device=labels.device).expand(B, T)
    nxt = kept_index + 1  # the token predicted by output position j
    valid = (kept_index >= 0) & (nxt < T)
    tgt = labels.gather(1, nxt.clamp(0, T - 1))
    return torch.where(valid, tgt, torch.full_like(tgt, IGNORE_INDEX))


def gather_rows(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``logits[b, index[b, j]]`` for every (b, j): (B, T, V), (B, T_out) -> (B, T_out, V)."""
    idx = index.clamp(min=0).unsqueeze(-1).expand(-1, -1, logits.shape[-1])
    return logits.gather(1, idx)


def answer_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over positions whose target is not IGNORE_INDEX. (B, T, V), (B, T) -> ()."""
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX
    )


def divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    kind: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl",
    beta: float = 0.5,
) -> torch.Tensor:
    """Per-row divergence between two categorical distributions given as logits. (N, V) -> (N,).

    forward_kl = KL(teacher || student) (mean-seeking), reverse_kl = KL(student || teacher)
    (mode-seeking), jsd = beta * KL(t || m) + (1 - beta) * KL(s || m), m = beta * t + (1 - beta) * s.
    """
    log_s = F.log_softmax(student_logits.float(), dim=-1)
    log_t = F.log_softmax(teacher_logits.float(), dim=-1)
    if kind == "forward_kl":
        return (log_t.exp() * (log_t - log_s)).sum(-1)
    if kind == "reverse_kl":
        return (log_s.exp() * (log_s - log_t)).sum(-1)
    if kind == "jsd":
        log_m = torch.logsumexp(
            torch.stack([log_t + torch.log(torch.tensor(beta)), log_s + torch.log(torch.tensor(1 - beta))]),
            dim=0,
        )
        kl_t = (log_t.exp() * (log_t - log_m)).sum(-1)
        kl_s = (log_s.exp() * (log_s - log_m)).sum(-1)
        return beta * kl_t + (1 - beta) * kl_s
    raise ValueError(f"unknown divergence kind {kind!r}")


def distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    kind: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
) -> torch.Tensor:
    """``T^2 * mean divergence(student / T, teacher / T)`` over answer positions.

    student_logits, teacher_logits: (B, T_out, V), aligned (teacher already gathered at the
    student's original positions); targets: (B, T_out), IGNORE_INDEX marks positions to skip.
    """
    mask = targets != IGNORE_INDEX  # (B, T_out)
    return distill_rows(student_logits[mask], teacher_logits[mask], kind, temperature, beta)


def distill_rows(
    student_rows: torch.Tensor,
    teacher_rows: torch.Tensor,
    kind: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
) -> torch.Tensor:
    """``T^2 * mean divergence(student / T, teacher / T)`` over matched rows (N, V); 0 when N == 0."""
    if student_rows.shape[0] == 0:
        return student_rows.sum() * 0.0
    s = student_rows / temperature
    t = teacher_rows.detach() / temperature
    return divergence(s, t, kind, beta).mean() * temperature**2

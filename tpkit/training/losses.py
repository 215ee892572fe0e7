"""Answer-token cross-entropy and distillation divergences for pruned students.

Once the pruner drops tokens, the student's logits no longer line up with ``labels``: output
position ``j`` of sample ``b`` is original position ``kept_index[b, j]`` and predicts the token
after it (:func:`tpkit.models.core.prefill.next_token_targets` maps labels through ``kept_index``);
the (unpruned) teacher's logits are gathered at the same original positions, so both sides predict
the same token.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

from tpkit.data.labels import IGNORE_INDEX, next_token_targets

__all__ = [
    "answer_positions",
    "answer_ce",
    "divergence",
    "divergence_logp",
    "topk_log_probs",
    "distill_rows_topk",
    "distill_rows",
    "hidden_cosine",
]


def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: the (unpruned) positions whose next token is an answer token, i.e. the rows that
    distillation compares."""
    return next_token_targets(labels) != IGNORE_INDEX


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
    return divergence_logp(log_s, log_t, kind, beta)


def divergence_logp(
    log_s: torch.Tensor,
    log_t: torch.Tensor,
    kind: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl",
    beta: float = 0.5,
) -> torch.Tensor:
    """:func:`divergence` between two distributions given as log-probabilities. (N, C) -> (N,)."""
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


# Floor of the teacher's tail mass in top-k distillation: a cached top-k that holds (nearly) all the
# mass leaves 1 - sum(p_k) at or below rounding error, and log(0) would make reverse KL infinite.
TAIL_FLOOR = 1e-8


def topk_log_probs(logits: torch.Tensor, indices: torch.Tensor, floor: float = 1e-12) -> torch.Tensor:
    """Log-probabilities of ``logits`` collapsed onto (the ``indices`` classes, everything else).

    logits: (N, V) (already divided by the temperature); indices: (N, k) -> (N, k + 1), last column
    = log of the mass outside ``indices`` (at least ``floor``).
    """
    return _with_rest(F.log_softmax(logits.float(), dim=-1).gather(1, indices), floor)


def _with_rest(log_k: torch.Tensor, floor: float) -> torch.Tensor:
    """(N, k) log-probabilities of k classes -> (N, k + 1) with log(1 - sum p_k) (at least ``floor``)."""
    rest = (-log_k.exp().sum(-1)).log1p().nan_to_num(nan=-math.inf)  # rounding can push sum p_k past 1
    return torch.cat([log_k, rest.clamp(min=math.log(floor)).unsqueeze(-1)], dim=-1)


def distill_rows_topk(
    student_rows: torch.Tensor,
    teacher_values: torch.Tensor,
    teacher_indices: torch.Tensor,
    teacher_lse: torch.Tensor,
    kind: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
) -> torch.Tensor:
    """:func:`distill_rows` against a teacher known only by its top-k logits (a teacher cache).

    Both distributions are collapsed onto the teacher's k classes plus one "rest" class. By the chain
    rule the collapsed KL misses only ``mass(rest) * KL(tail | tail)``: it is a lower bound of the full
    one, equal to it when k is the vocabulary or the student's tail has the teacher's shape, and close
    when the teacher's top k holds nearly all of its mass (trained LMs at T = 1).
    teacher_values: (N, k) raw logits; teacher_indices: (N, k) vocab ids; teacher_lse: (N,)
    ``logsumexp(teacher_logits / temperature)`` over the full vocabulary.
    """
    if student_rows.shape[0] == 0:
        return student_rows.sum() * 0.0
    log_tk = teacher_values.float() / temperature - teacher_lse.float().unsqueeze(-1)  # (N, k)
    if teacher_indices.shape[1] == student_rows.shape[1]:  # the whole vocabulary: no rest class
        log_s = F.log_softmax(student_rows.float() / temperature, dim=-1).gather(1, teacher_indices)
        return divergence_logp(log_s, log_tk.detach(), kind, beta).mean() * temperature**2
    log_s = topk_log_probs(student_rows / temperature, teacher_indices)  # (N, k + 1)
    log_t = _with_rest(log_tk, TAIL_FLOOR)  # (N, k + 1)
    return divergence_logp(log_s, log_t.detach(), kind, beta).mean() * temperature**2


def hidden_cosine(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean ``1 - cos`` between matching rows: (N, D), (N, D) -> (); 0 for N = 0."""
    if student.shape != teacher.shape:
        raise ValueError(
            f"hidden rows differ in shape: student {tuple(student.shape)}, teacher {tuple(teacher.shape)}"
        )
    if student.shape[0] == 0:
        return student.sum() * 0.0
    return (1.0 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)).mean()

import pytest
import torch
import torch.nn.functional as F

from tpkit.data.labels import IGNORE_INDEX
from tpkit.training.losses import answer_ce, answer_positions, distill_rows, divergence


def distill_loss(student, teacher, targets, **kw):
    """KD over the answer positions of aligned (B, T, V) logits: the rows distill_rows compares."""
    mask = targets != IGNORE_INDEX
    return distill_rows(student[mask], teacher[mask], **kw)


def test_answer_positions_are_the_tokens_before_answers():
    labels = torch.tensor([[-100, -100, -100, -100, 40, 50], [-100, 7, -100, -100, -100, 8]])
    assert answer_positions(labels).tolist() == [
        [False, False, False, True, True, False],
        [True, False, False, False, True, False],
    ]


def test_ce_equals_cross_entropy_by_hand():
    logits = torch.tensor([[[2.0, 0.0, -1.0], [0.5, 0.5, 0.0], [1.0, 2.0, 3.0]]])
    targets = torch.tensor([[IGNORE_INDEX, 2, 0]])
    expected = (-F.log_softmax(logits[0, 1], -1)[2] - F.log_softmax(logits[0, 2], -1)[0]) / 2
    torch.testing.assert_close(answer_ce(logits, targets), expected)
    torch.testing.assert_close(answer_ce(logits, targets), F.cross_entropy(logits[0, 1:], targets[0, 1:]))


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_kd_zero_when_student_equals_teacher(kind):
    logits = torch.randn(2, 5, 11, generator=torch.Generator().manual_seed(0))
    targets = torch.tensor([[1, 2, IGNORE_INDEX, 3, 4], [IGNORE_INDEX] * 4 + [7]])
    kd = distill_loss(logits, logits.clone(), targets, kind=kind, temperature=2.0)
    assert kd.abs().item() < 1e-6


def test_divergences_match_definitions():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(4, 7, generator=g), torch.randn(4, 7, generator=g)
    ps, pt = s.softmax(-1), t.softmax(-1)
    fkl = (pt * (pt.log() - ps.log())).sum(-1)
    torch.testing.assert_close(divergence(s, t, "forward_kl"), fkl)
    torch.testing.assert_close(
        divergence(s, t, "forward_kl"), F.kl_div(s.log_softmax(-1), pt, reduction="none").sum(-1)
    )
    torch.testing.assert_close(divergence(s, t, "reverse_kl"), (ps * (ps.log() - pt.log())).sum(-1))
    m = 0.5 * (ps + pt)
    jsd = 0.5 * (pt * (pt.log() - m.log())).sum(-1) + 0.5 * (ps * (ps.log() - m.log())).sum(-1)
    torch.testing.assert_close(divergence(s, t, "jsd"), jsd)
    # JSD(beta=0.5) is symmetric, KL is not
    torch.testing.assert_close(divergence(s, t, "jsd"), divergence(t, s, "jsd"))
    assert not torch.allclose(divergence(s, t, "forward_kl"), divergence(t, s, "forward_kl"))
    assert (divergence(s, t, "forward_kl") > 0).all()


def test_distill_loss_temperature_scaling_and_no_teacher_grad():
    g = torch.Generator().manual_seed(2)
    s = torch.randn(1, 3, 5, generator=g, requires_grad=True)
    t = torch.randn(1, 3, 5, generator=g, requires_grad=True)
    targets = torch.tensor([[0, IGNORE_INDEX, 1]])
    kd = distill_loss(s, t, targets, temperature=2.0)
    rows = torch.tensor([0, 2])
    expected = divergence(s[0, rows] / 2, t[0, rows] / 2).mean() * 4
    torch.testing.assert_close(kd, expected)
    kd.backward()
    assert s.grad is not None and t.grad is None
    # no answer position: a zero that still backpropagates
    none = distill_loss(s, t, torch.full((1, 3), IGNORE_INDEX))
    assert none.item() == 0.0 and none.requires_grad


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_distillation(kind, temperature):
    """Top-k teacher rows (a teacher cache): exact with the whole vocabulary; with k classes, the
    divergence of the collapsed (top-k + rest) pair, which by the chain rule misses only the term
    mass(rest) * D(tail | tail) — zero when the student's tail has the teacher's shape; 0 when the
    student is the teacher."""
    from tpkit.training.losses import distill_rows, distill_rows_topk

    g = torch.Generator().manual_seed(0)
    V, k = 200, 32
    teacher = torch.randn(16, V, generator=g)
    lse = torch.logsumexp(teacher / temperature, -1)
    student = teacher + torch.randn(16, V, generator=g)
    full = distill_rows(student, teacher, kind, temperature)
    v, i = teacher.topk(V, -1)
    torch.testing.assert_close(
        distill_rows_topk(student, v, i, lse, kind, temperature), full, rtol=1e-5, atol=1e-6
    )
    v, i = teacher.topk(k, -1)
    assert float(distill_rows_topk(student, v, i, lse, kind, temperature)) < float(full)  # a lower bound
    # the student differs on the teacher's top k, and by a constant on the rest: same tail shape
    shift = torch.zeros(16, V).scatter_(1, i, torch.randn(16, k, generator=g)) - 0.5
    shift = torch.where(torch.zeros(16, V, dtype=torch.bool).scatter_(1, i, True), shift + 0.5, shift)
    student = teacher + shift
    full = distill_rows(student, teacher, kind, temperature)
    top = distill_rows_topk(student, v, i, lse, kind, temperature)
    torch.testing.assert_close(top, full, rtol=0.02 if kind == "jsd" else 1e-4, atol=1e-6)
    assert float(distill_rows_topk(teacher, v, i, lse, kind, temperature)) == pytest.approx(0.0, abs=1e-5)
    s = student.clone().requires_grad_(True)
    distill_rows_topk(s, v, i, lse, kind, temperature).backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0

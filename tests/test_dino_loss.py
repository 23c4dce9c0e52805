"""DINOLoss against values computed by hand, with 2 and 3 teacher crops, and the centre update."""

from __future__ import annotations

import math

import pytest
import torch

from main_dino_mc import DINOLoss


def softmax(xs):
    exps = [math.exp(x - max(xs)) for x in xs]
    return [e / sum(exps) for e in exps]


def hand_loss(student, teacher, n_teacher, center, t_temp, s_temp=0.1):
    """Plain-python DINO loss: student/teacher are lists of crops, each a list of batch rows."""
    total, terms = 0.0, 0
    for i in range(n_teacher):
        for v in range(len(student)):
            if v == i:
                continue
            batch = []
            for t_row, s_row in zip(teacher[i], student[v]):
                q = softmax([(t - c) / t_temp for t, c in zip(t_row, center)])
                p = softmax([s / s_temp for s in s_row])
                batch.append(-sum(qk * math.log(pk) for qk, pk in zip(q, p)))
            total += sum(batch) / len(batch)
            terms += 1
    return total / terms


@pytest.mark.parametrize("n_teacher,n_local", [(2, 2), (3, 6)])
def test_loss_matches_hand_computation(n_teacher, n_local):
    torch.manual_seed(n_teacher)
    batch, out_dim = 2, 5
    ncrops = n_teacher + n_local
    student = torch.randn(ncrops * batch, out_dim)
    teacher = torch.randn(n_teacher * batch, out_dim)
    loss_fn = DINOLoss(out_dim, ncrops, 0.04, 0.07, 0, 10, teacher_crops_number=n_teacher)
    center = [0.1, -0.2, 0.0, 0.3, 0.05]
    loss_fn.center = torch.tensor([center])

    loss, _ = loss_fn(student, teacher, epoch=3)

    crops_s = [student[i * batch : (i + 1) * batch].tolist() for i in range(ncrops)]
    crops_t = [teacher[i * batch : (i + 1) * batch].tolist() for i in range(n_teacher)]
    expected = hand_loss(crops_s, crops_t, n_teacher, center, t_temp=0.07)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_two_crop_loss_value_by_hand():
    # one sample, two crops, out_dim 2: only pairs (0, 1) and (1, 0) count
    student = torch.tensor([[0.0, 0.1], [0.2, 0.0]])
    teacher = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    loss_fn = DINOLoss(2, 2, 0.5, 0.5, 0, 1, student_temp=0.1)
    loss = loss_fn(student, teacher, epoch=0)[0].item()
    q0 = [math.exp(2) / (math.exp(2) + 1), 1 / (math.exp(2) + 1)]  # softmax([1, 0] / 0.5)
    q1 = q0[::-1]
    logp1 = [2 - math.log(math.exp(2) + 1), -math.log(math.exp(2) + 1)]  # log_softmax([2, 0])
    logp0 = [-math.log(1 + math.exp(1)), 1 - math.log(1 + math.exp(1))]  # log_softmax([0, 1])
    pair01 = -(q0[0] * logp1[0] + q0[1] * logp1[1])
    pair10 = -(q1[0] * logp0[0] + q1[1] * logp0[1])
    assert loss == pytest.approx((pair01 + pair10) / 2, rel=1e-6)


def test_center_update_is_ema_of_teacher_mean():
    loss_fn = DINOLoss(3, 4, 0.04, 0.04, 0, 1, teacher_crops_number=2, center_momentum=0.9)
    loss_fn.center = torch.tensor([[1.0, 0.0, -1.0]])
    teacher = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0], [0.0, 0.0, 0.0], [4.0, 0.0, 4.0]])
    loss_fn(torch.randn(8, 3), teacher, epoch=0)
    mean = teacher.mean(0, keepdim=True)  # over the batch and both teacher crops
    torch.testing.assert_close(loss_fn.center, 0.9 * torch.tensor([[1.0, 0.0, -1.0]]) + 0.1 * mean)
    assert "center" in loss_fn.state_dict()


def test_teacher_temperature_warmup_schedule():
    loss_fn = DINOLoss(3, 4, 0.04, 0.07, warmup_teacher_temp_epochs=4, nepochs=10)
    assert loss_fn.teacher_temp_schedule[0] == pytest.approx(0.04)
    assert loss_fn.teacher_temp_schedule[3] == pytest.approx(0.07)
    assert loss_fn.teacher_temp_schedule[9] == pytest.approx(0.07)
    assert len(loss_fn.teacher_temp_schedule) == 10

"""Reference values computed independently of the code under test (float64, from the definitions)."""

from __future__ import annotations

import torch


def kl_by_hand(student, teacher, center, n_teacher, teacher_temp, student_temp) -> float:
    """KL(teacher || student) from the two distributions themselves, in float64: sum_k q_k log(q_k / p_k) per
    image, averaged over the batch and then over the loss's (teacher crop i, student crop v != i) pairs.
    ``student`` and ``teacher`` are the logits, crop after crop, as DINOLoss takes them."""
    ncrops = len(student) // (len(teacher) // n_teacher)
    log_q = torch.log_softmax((teacher.double() - center.double()) / teacher_temp, dim=-1).chunk(n_teacher)
    log_p = torch.log_softmax(student.double() / student_temp, dim=-1).chunk(ncrops)
    pairs = [
        (log_q[i].exp() * (log_q[i] - log_p[v])).sum(dim=-1).mean()  # q log(q / p); a q that underflows adds 0
        for i in range(n_teacher)
        for v in range(ncrops)
        if v != i
    ]
    return (sum(pairs) / len(pairs)).item()

"""Health metrics of pretraining against values computed by hand, and the collapse warning's regimes."""

from __future__ import annotations

import math

import pytest
import torch

import health
from main_dino_mc import DINOLoss
from tests.by_hand import kl_by_hand

K = 8


def signals(*args, **kwargs) -> torch.Tensor:
    return health.step_metrics(*args, **kwargs)[0]


def test_entropies_of_uniform_one_hot_and_mixed_distributions():
    uniform = torch.full((4, K), 1.0 / K)
    one_hot = torch.nn.functional.one_hot(torch.tensor([3, 3, 3, 3]), K).float()
    spread_one_hot = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 3]), K).float()
    features = torch.randn(4, 5)
    loss = torch.tensor(2.5)

    m = signals(uniform, loss, features, n_crops=1)
    assert m[0].item() == pytest.approx(math.log(K)) and m[1].item() == pytest.approx(math.log(K))

    m = signals(one_hot, loss, features, n_crops=1)
    assert m[0].item() == pytest.approx(0.0) and m[1].item() == pytest.approx(0.0)  # one prototype for all

    m = signals(spread_one_hot, loss, features, n_crops=1)
    assert m[0].item() == pytest.approx(0.0) and m[1].item() == pytest.approx(math.log(4))  # sharp, 4 used

    # A mix: each image half on its own prototype, half on a shared one -> per image ln 2; the batch mean
    # puts 1/2 on the shared prototype and 1/8 on each of 4 others: -(1/2 ln 1/2 + 4/8 ln 1/8).
    mixed = torch.zeros(4, K)
    mixed[:, 0] = 0.5
    mixed[torch.arange(4), torch.arange(1, 5)] = 0.5
    m = signals(mixed, loss, features, n_crops=1)
    assert m[0].item() == pytest.approx(math.log(2))
    assert m[1].item() == pytest.approx(-(0.5 * math.log(0.5) + 0.5 * math.log(1 / 8)))


@pytest.mark.parametrize("n_teacher,n_local", [(2, 2), (3, 6)])
def test_kl_signal_is_the_kl_divergence_of_the_loss_pairs(n_teacher, n_local):
    """The logged teacher-student KL, from DINOLoss's own teacher distributions and loss, equals the KL computed
    independently from the teacher's and the student's distributions (DINO-MC: 2 teacher crops, DINO-TP: 3)."""
    torch.manual_seed(n_teacher)
    batch, ncrops = 3, n_teacher + n_local
    student, teacher = torch.randn(ncrops * batch, K), 3 * torch.randn(n_teacher * batch, K)
    center = 0.5 * torch.randn(1, K)
    loss_fn = DINOLoss(K, ncrops, 0.07, 0.07, 0, 1, teacher_crops_number=n_teacher)
    loss_fn.center = center.clone()
    loss, teacher_probs = loss_fn(student, teacher, epoch=0)
    kl = signals(teacher_probs, loss, torch.randn(n_teacher * batch, 4), n_crops=n_teacher)[2].item()
    expected = kl_by_hand(student, teacher, center, n_teacher, 0.07, 0.1)
    assert expected > 0.1  # distributions that differ: a KL well away from 0
    assert kl == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_kl_signal_is_zero_when_the_student_matches_the_teacher():
    """Every crop of an image the same and the student's logits the teacher's, rescaled to its temperature: the
    distributions are equal, so the KL is 0 although the loss (the teacher's entropy) is not."""
    torch.manual_seed(0)
    logits, center = torch.randn(2, K), 0.3 * torch.randn(1, K)
    teacher = logits.repeat(2, 1)  # 2 teacher crops of a batch of 2
    student = ((logits - center) * 0.1 / 0.5).repeat(4, 1)  # 2 global + 2 local crops
    loss_fn = DINOLoss(K, 4, 0.5, 0.5, 0, 1)  # a warm teacher: an entropy well above 0
    loss_fn.center = center.clone()
    loss, teacher_probs = loss_fn(student, teacher, epoch=0)
    kl = signals(teacher_probs, loss, torch.randn(4, 4), n_crops=2)[2].item()
    assert kl_by_hand(student, teacher, center, 2, 0.5, 0.1) == pytest.approx(0.0, abs=1e-9)
    assert loss.item() > 0.5 and kl == pytest.approx(0.0, abs=1e-5)


def test_batch_entropy_is_per_teacher_crop():
    """Two teacher crops whose batches each use one prototype (a different one per crop): per crop the batch
    mean is one-hot (entropy 0), although over both crops two prototypes are used."""
    probs = torch.nn.functional.one_hot(torch.tensor([1, 1, 1, 6, 6, 6]), K).float()
    m = signals(probs, torch.tensor(1.0), torch.randn(6, 3), n_crops=2)
    assert m[1].item() == pytest.approx(0.0)


def test_feature_spread_is_one_for_spread_features_and_zero_for_one_point():
    d = 6
    basis = torch.cat([torch.eye(d), -torch.eye(d)])  # evenly spread on the sphere: per-dim std 1/sqrt(d)
    probs = torch.full((2 * d, K), 1.0 / K)
    assert signals(probs, torch.tensor(0.0), basis, 1)[3].item() == pytest.approx(1.0)
    same = torch.ones(2 * d, d) * torch.randn(1, d)
    assert signals(probs, torch.tensor(0.0), same, 1)[3].item() == pytest.approx(0.0, abs=1e-6)


def test_feature_dimensions_count_the_directions_features_vary_along():
    """Participation ratio by hand: images on one line -> 1; on k orthogonal directions with equal spread -> k;
    two directions with variances 4 and 1 -> (4 + 1)^2 / (16 + 1); one point -> 0. The features are
    L2-normalised first, so each case is built from unit vectors."""
    probs = torch.full((8, K), 1.0 / K)
    line = torch.tensor([[1.0, 0, 0], [-1.0, 0, 0]]).repeat(4, 1)  # +-e1: variance along e1 only
    assert signals(probs, torch.tensor(0.0), line, 1)[4].item() == pytest.approx(1.0)
    for k in (2, 3, 4):
        assert health.participation_ratio(torch.cat([torch.eye(k), -torch.eye(k)])).item() == pytest.approx(k)
    a, b = 2.0, 1.0
    uneven = torch.tensor([[a, 0], [-a, 0], [0, b], [0, -b]])  # eigenvalues of its scatter: 2a^2, 2b^2
    expected = (a**2 + b**2) ** 2 / (a**4 + b**4)
    assert health.participation_ratio(uneven).item() == pytest.approx(expected)
    assert signals(probs, torch.tensor(0.0), torch.ones(8, 3), 1)[4].item() == pytest.approx(0.0, abs=1e-6)
    # Per teacher crop, then averaged: crop 1 on a line (1), crop 2 on two directions (2) -> 1.5.
    two_crops = torch.cat([line[:4], torch.tensor([[1.0, 0, 0], [-1.0, 0, 0], [0, 1.0, 0], [0, -1.0, 0]])])
    assert signals(probs, torch.tensor(0.0), two_crops, 2)[4].item() == pytest.approx(1.5)


def test_prototype_usage_counts_argmaxes():
    usage = health.PrototypeUsage(K, "cpu")
    for winners in ([2, 2, 5], [5, 7]):
        probs = torch.nn.functional.one_hot(torch.tensor(winners), K).float() * 0.9 + 0.1 / K
        usage.update(health.step_metrics(probs, torch.tensor(1.0), torch.randn(len(winners), 3), 1)[1])
    assert usage.count() == 3


HEALTHY = {
    "teacher_entropy": 0.5,
    "teacher_batch_entropy": 1.8,
    "feature_std": 0.4,
    "feature_dims": 5.0,
    "prototypes_used": 6,
}


# What each regime's advice must say, and what it must not: the teacher temperature goes down against a flat
# teacher and up against one that puts every image on the same prototypes or spreads them too little; it has no
# bearing on a backbone that maps everything to one point.
ADVICE_SAYS = {
    "uniform": (["a lower --teacher_temp", "a shorter --warmup_teacher_temp_epochs"], ["a higher --teacher_temp"]),
    "one-prototype": (["a higher --teacher_temp", "--precision fp32"], ["a lower --teacher_temp"]),
    "features": (["a lower --lr", "--precision fp32"], ["--teacher_temp"]),
    "dimensional": (["a higher --teacher_temp", "a longer --warmup_teacher_temp_epochs"], ["a lower --teacher_temp"]),
}


@pytest.mark.parametrize(
    "change, regime",
    [
        ({}, None),
        ({"teacher_entropy": math.log(K) * 0.95, "teacher_batch_entropy": math.log(K)}, "uniform"),
        ({"teacher_entropy": 0.0, "teacher_batch_entropy": 0.05}, "one-prototype"),
        ({"prototypes_used": 1}, "one-prototype"),
        ({"feature_std": 0.01}, "features"),
        ({"feature_dims": 1.1}, "dimensional"),
    ],
)
def test_collapse_regimes_and_one_warning_line(change, regime):
    stats = {**HEALTHY, **change}
    assert health.collapse_regime(stats, K, batch_size=16) == regime
    warning = health.collapse_warning(stats, K, epoch=3, batch_size=16)
    if regime is None:
        assert warning is None
    else:
        assert warning.startswith(f"warning: epoch 3: {regime} collapse") and "\n" not in warning
        advice = warning.split("What usually helps: ")[1]
        says, never = ADVICE_SAYS[regime]
        assert all(phrase in advice for phrase in says) and not any(phrase in advice for phrase in never), advice
        assert health.advice(regime) in advice
        assert not any(health.advice(other) in advice for other in health.ADVICE if other != regime)


def test_dimensional_regime_needs_a_batch_that_can_show_two_dimensions():
    """Four images span at most three dimensions: their participation ratio says little, so no warning."""
    stats = {**HEALTHY, "feature_dims": 1.1}
    assert health.collapse_regime(stats, K, batch_size=health.MIN_BATCH_FOR_DIMS) == "dimensional"
    assert health.collapse_regime(stats, K, batch_size=4) is None


@pytest.mark.parametrize("regime", sorted(health.ADVICE))
def test_advice_leaves_out_what_the_run_already_does(regime):
    everything = health.advice(regime, norm_last_layer=False, precision="fp16")
    in_effect = health.advice(regime, norm_last_layer=True, precision="bf16")
    for setting in (health.NORM_LAST_LAYER, health.FP32):
        assert (setting in everything) == (setting in health.ADVICE[regime])
        assert setting not in in_effect
    assert in_effect and in_effect in everything.replace(f", {health.NORM_LAST_LAYER}", "").replace(
        f", {health.FP32}", ""
    )


def test_collapse_warning_with_norm_last_layer_on_does_not_advise_it():
    stats = {**HEALTHY, "teacher_entropy": 0.99 * math.log(K), "teacher_batch_entropy": 0.99 * math.log(K)}
    warning = health.collapse_warning(stats, K, epoch=0, batch_size=16, norm_last_layer=True, precision="fp32")
    assert warning is not None and "uniform collapse" in warning and "--norm_last_layer" not in warning
    assert "--norm_last_layer true" in health.collapse_warning(stats, K, 0, 16, norm_last_layer=False)


def test_small_batch_advice_once_under_256_without_settings_in_effect():
    assert health.small_batch_advice(256, 0.996, 6) is None
    note = health.small_batch_advice(32, 0.996, 6)
    assert note.startswith("note: the total batch is 32 images") and "--momentum_teacher 0.9995" in note
    assert "--momentum_teacher" not in health.small_batch_advice(32, 0.9995, 6)
    assert "--local_crops_number" not in health.small_batch_advice(32, 0.996, 10)

"""Health of a DINO pretraining run: is the teacher learning, or collapsing?

A collapsing DINO run looks like a working one in its loss alone. DINO avoids collapse with two opposite
forces on the teacher's output: centring (pushes towards the uniform distribution) and sharpening (a low
teacher temperature, pushes towards one prototype). When one wins, the run collapses (DINO paper, section 5.3
and Fig. 7), and these signals say which way:

- ``teacher_entropy``: entropy of the centred, sharpened teacher distribution of each image, mean over the
  batch. Uniform collapse drives it to ln(out_dim); one-prototype collapse to 0; a healthy teacher is sharp
  per image (well below ln(out_dim)).
- ``teacher_batch_entropy``: entropy of the batch mean of those distributions. Uniform collapse drives it to
  ln(out_dim) too; one-prototype collapse to 0; a healthy teacher spreads its images over many prototypes
  (high).
- ``teacher_student_kl``: KL(teacher || student) averaged over the loss's (teacher crop, student crop) pairs,
  the DINO paper's Fig. 7 pair with the entropy: it is the loss minus the teacher's entropy (cross-entropy =
  entropy + KL), so it costs nothing. Near 0 with a flat teacher means the student just copies a constant.
- ``feature_std``: standard deviation across the batch of the L2-normalised teacher backbone features, per
  dimension, averaged over dimensions and multiplied by sqrt(dim), so that features spread evenly over the
  sphere give about 1 and all images mapped to one point give 0.
- ``feature_dims``: the effective number of dimensions the teacher backbone features of a batch vary along,
  the participation ratio (sum of the covariance eigenvalues)^2 / (sum of their squares) of the centred,
  L2-normalised features, per teacher crop and averaged: 1 when every image sits on one line, k for k
  equally strong directions. It catches what the spread cannot: features that are spread, but along one
  direction (dimensional collapse, Jing et al. 2022; RankMe, Garrido et al. 2023, rank a whole
  representation the same way with the entropy of its singular values). Computed as
  trace(G)^2 / ||G||_F^2 of the batch's Gram matrix G, one small matmul: no decomposition, no synchronisation.
- ``prototypes_used``: how many prototypes are the argmax of at least one teacher output in the epoch.

Everything is computed without gradients on tensors the step already has (the loss's teacher
probabilities, the teacher's backbone features): no extra forward pass, and no host-device synchronisation
(the values travel with the loss's single read-back, see ``main_dino_mc.agree_on_step``).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

STEP_METRICS = ("teacher_entropy", "teacher_batch_entropy", "teacher_student_kl", "feature_std", "feature_dims")

# Collapse regimes, on the epoch means, as fractions of ln(out_dim) (the entropy of the uniform distribution)
# and of the spread of evenly spread features. Why these values: a teacher whose every image distribution has
# 90 % of the maximal entropy is as flat as a random guess over most prototypes (uniform collapse; DINO's
# healthy runs sit far below, its Fig. 7 collapse curves at the maximum); a batch mean with under 10 % of it
# puts nearly all the mass on a handful of prototypes for every image (one-prototype collapse); features whose
# spread is under 5 % of an even spread on the sphere have nearly merged into one point; features whose
# participation ratio is under 1.2 put over 83 % of their variance along one direction (the ratio is
# 1 / sum(p_i^2) <= 1 / p_1 for variance fractions p_i), i.e. they order the images along a line (brightness,
# say) whatever their spread. The bar is that low because small ViTs start low: a random ViT-Tiny's features
# measure about 1.9, and demo runs whose k-NN gains 7-13 points over it stay at 1.4-1.8 (docs/demo.md).
UNIFORM_ENTROPY_FRACTION = 0.9
ONE_PROTOTYPE_ENTROPY_FRACTION = 0.1
MIN_FEATURE_SPREAD = 0.05
MIN_FEATURE_DIMS = 1.2
# B images span at most B - 1 dimensions, so the dimensional regime is judged only on batches (per process)
# of at least this many images, where healthy features have room to show several.
MIN_BATCH_FOR_DIMS = 8

# What usually helps against each regime, in order; the last two items are offered only when the run does not
# already have them (:func:`advice`).
NORM_LAST_LAYER = "--norm_last_layer true"
FP32 = "--precision fp32 (DINO's --use_fp16 false)"
ADVICE = {
    "uniform": (
        "a lower --teacher_temp (or a shorter --warmup_teacher_temp_epochs) to sharpen the teacher",
        "a higher --momentum_teacher",
        "a lower --lr or a larger batch",
        NORM_LAST_LAYER,
    ),
    "one-prototype": (
        "a higher --teacher_temp",
        "a higher --momentum_teacher",
        "a lower --lr or a larger batch",
        NORM_LAST_LAYER,
        FP32,
    ),
    "features": ("a lower --lr or a larger batch", "a higher --momentum_teacher", NORM_LAST_LAYER, FP32),
    "dimensional": (
        "a lower --lr or a larger batch",
        "a higher --momentum_teacher",
        "a higher --teacher_temp (or a longer --warmup_teacher_temp_epochs) to spread images over more prototypes",
        "more epochs",
        FP32,
    ),
}


ENTROPY_FLOOR = 1e-30  # probabilities below count as this; their share of an entropy is < K * 7e-29 nats


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of each row of a (N, K) probability matrix (0 log 0 = 0, to within the floor's share)."""
    floored = probs.clamp_min(ENTROPY_FLOOR)
    return -(floored * floored.log()).sum(dim=-1)


@torch.no_grad()
def step_metrics(
    teacher_probs: torch.Tensor, loss: torch.Tensor, teacher_features: torch.Tensor, n_crops: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-step signals (:data:`STEP_METRICS` order) as one tensor on the step's device, and the prototype
    each teacher output puts most mass on (for :class:`PrototypeUsage`).

    ``teacher_probs``: (n_crops * B, K) centred, sharpened teacher distributions, the loss's targets, crop by
    crop; ``loss``: the DINO loss of the step; ``teacher_features``: (n_crops * B, D) teacher backbone features
    of the same crops. The batch entropy is taken per teacher crop (a batch of B images) and averaged, so it
    does not depend on how many teacher crops the mode has.

    Why one floored copy first: a sharpened teacher over 65536 prototypes holds many subnormal probabilities
    (below 1.2e-38), on which a CPU computes several times slower; after one pass that raises them to
    :data:`ENTROPY_FLOOR`, the entropies, the batch mean and the argmax all run on normal numbers.
    """
    floored = teacher_probs.clamp_min(ENTROPY_FLOOR)
    per_image = -(floored * floored.log()).sum(dim=-1).mean()
    batch_entropy = entropy(floored.view(n_crops, -1, floored.shape[-1]).mean(dim=1)).mean()
    features = F.normalize(teacher_features.float(), dim=-1)
    spread = features.std(dim=0, correction=0).mean() * math.sqrt(features.shape[-1])
    dims = participation_ratio(features.view(n_crops, -1, features.shape[-1])).mean()
    signals = torch.stack([per_image, batch_entropy, loss.detach().float() - per_image, spread, dims])
    return signals, floored.argmax(dim=-1)


def participation_ratio(features: torch.Tensor) -> torch.Tensor:
    """Effective number of dimensions of each (..., N, D) batch of features: (sum of the eigenvalues of their
    covariance)^2 / (sum of their squares), from the Gram matrix of the centred rows (the eigenvalues of
    X X^T and X^T X are the same), so that it costs an N x N x D matmul. 0 for a batch with no spread."""
    centred = features - features.mean(dim=-2, keepdim=True)
    gram = centred @ centred.transpose(-1, -2)
    trace = gram.diagonal(dim1=-2, dim2=-1).sum(dim=-1)
    return trace.square() / gram.square().sum(dim=(-2, -1)).clamp_min(torch.finfo(gram.dtype).tiny)


class PrototypeUsage:
    """Which prototypes were the argmax of at least one teacher output, over an epoch (all processes)."""

    def __init__(self, out_dim: int, device: torch.device | str):
        self.used = torch.zeros(out_dim, dtype=torch.bool, device=device)

    def update(self, winners: torch.Tensor) -> None:
        """Mark the prototypes in ``winners`` (the argmax of each teacher output) as used."""
        self.used[winners] = True

    def count(self) -> int:
        used = self.used.to(torch.uint8)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(used, op=dist.ReduceOp.MAX)
        return int(used.sum())


def collapse_regime(stats: dict[str, float], out_dim: int, batch_size: int) -> str | None:
    """The collapse regime the epoch's mean signals are in ("uniform", "one-prototype", "features",
    "dimensional"), or None; ``batch_size`` is the per-process batch the features were measured on."""
    max_entropy = math.log(out_dim)
    if stats["teacher_entropy"] >= UNIFORM_ENTROPY_FRACTION * max_entropy:
        return "uniform"
    if stats["teacher_batch_entropy"] <= ONE_PROTOTYPE_ENTROPY_FRACTION * max_entropy or stats["prototypes_used"] <= 1:
        return "one-prototype"
    if stats["feature_std"] <= MIN_FEATURE_SPREAD:
        return "features"
    if batch_size >= MIN_BATCH_FOR_DIMS and stats["feature_dims"] < MIN_FEATURE_DIMS:
        return "dimensional"
    return None


# DINO's recipes train with a total batch of 256 or more; below, its authors advise a slower teacher.
SMALL_BATCH = 256
SMALL_BATCH_MOMENTUM = 0.9995


def small_batch_advice(total_batch: int, momentum_teacher: float, local_crops_number: int) -> str | None:
    """One line of DINO's advice for a total batch under 256 (None from 256 on), without what is in effect."""
    if total_batch >= SMALL_BATCH:
        return None
    items = []
    if momentum_teacher < SMALL_BATCH_MOMENTUM:
        items.append(f"a teacher momentum closer to 1 (e.g. --momentum_teacher {SMALL_BATCH_MOMENTUM})")
    items.append("a learning rate tried around the scaled default (--lr is per 256 images)")
    if local_crops_number < 10:
        items.append("more local crops (--local_crops_number; in mc and tp with as many --size_crops)")
    return (
        f"note: the total batch is {total_batch} images, under the {SMALL_BATCH} of DINO's recipes; for small "
        f"batches DINO advises {', '.join(items)}"
    )


def advice(regime: str, norm_last_layer: bool | None = None, precision: str | None = None) -> str:
    """What usually helps against ``regime``, without the settings the run already has (None: unknown)."""
    in_effect = {NORM_LAST_LAYER: norm_last_layer is True, FP32: precision not in (None, "fp16")}
    return ", ".join(item for item in ADVICE[regime] if not in_effect.get(item, False))


def collapse_warning(
    stats: dict[str, float],
    out_dim: int,
    epoch: int,
    batch_size: int,
    norm_last_layer: bool | None = None,
    precision: str | None = None,
) -> str | None:
    """One warning line for an epoch whose signals are in a collapse regime (None for a healthy epoch); its
    advice leaves out what the run already does (``norm_last_layer``, ``precision``; None: not known)."""
    regime = collapse_regime(stats, out_dim, batch_size)
    if regime is None:
        return None
    max_entropy = math.log(out_dim)
    what = {
        "uniform": "the teacher gives every image an almost flat distribution over the prototypes",
        "one-prototype": "the teacher gives every image the same few prototypes",
        "features": "the backbone maps all images to nearly one point",
        "dimensional": "the backbone features vary along one direction only",
    }[regime]
    return (
        f"warning: epoch {epoch}: {regime} collapse: {what} (teacher entropy {stats['teacher_entropy']:.2f}, "
        f"batch entropy {stats['teacher_batch_entropy']:.2f}, ln(out_dim) {max_entropy:.2f}, feature spread "
        f"{stats['feature_std']:.3f}, feature dimensions {stats['feature_dims']:.2f}, "
        f"{int(stats['prototypes_used'])} of {out_dim} prototypes used). What usually "
        f"helps: {advice(regime, norm_last_layer, precision)}. Training goes on."
    )

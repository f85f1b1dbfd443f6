"""Loss functions from Su Jianlin's Scientific Spaces posts (kexue.fm), in optax's conventions.

Prediction first, target second; per-example output (the caller reduces); optional ``where=``
class masks; hyperparameters keyword-only; float16/bfloat16 inputs computed in float32 and
returned in the input dtype. Nothing here depends on ``train_lib`` or ``models``.
"""
KEXUE_JAX_PACKAGE = "losses"  # train_lib checks this marker: another distribution's `losses` would lack it

from losses.classification import (
    exact_loss,
    exact_sigma_schedule,
    logit_adjusted_cross_entropy,
    rdrop_loss,
    smooth_accuracy_loss,
    softmax_focal_loss,
)
from losses.contrastive import contrastive_grad_cache, flatnce
from losses.gaussian import (
    gaussian_bhattacharyya_distance,
    gaussian_kl_divergence,
    gaussian_wasserstein_distance_squared,
)
from losses.multilabel import (
    multilabel_categorical_crossentropy,
    sparse_multilabel_categorical_crossentropy,
)
from losses.perturb_max import perturb_max_probabilities
from losses.regularizers import with_gradient_penalty
from losses.self_supervised import negative_cosine_similarity, simsiam_loss

__all__ = [
    "contrastive_grad_cache",
    "exact_loss",
    "exact_sigma_schedule",
    "flatnce",
    "gaussian_bhattacharyya_distance",
    "gaussian_kl_divergence",
    "gaussian_wasserstein_distance_squared",
    "logit_adjusted_cross_entropy",
    "multilabel_categorical_crossentropy",
    "negative_cosine_similarity",
    "perturb_max_probabilities",
    "rdrop_loss",
    "simsiam_loss",
    "smooth_accuracy_loss",
    "softmax_focal_loss",
    "sparse_multilabel_categorical_crossentropy",
    "with_gradient_penalty",
]

"""How good is a self-supervised representation: linear-probe and k-NN accuracy on the test split.

    python -m train_lib.selfsup.probe --workdir=runs/simsiam_digits [--output=results.json]

The representation is the online encoder's output h (no augmentation). The linear probe is multinomial
logistic regression (scikit-learn's L-BFGS, C = 1) on h standardised with the training split's mean and std;
k-NN classifies each test image by the majority label of its `probe.knn_k` nearest training images in cosine
similarity (ties to the class whose neighbours are more similar in sum). The same k-NN on the projector's
output z (`knn_accuracy_projection`) shows what collapse does to the space the loss shapes. The collapse
diagnostics over the whole test split come with them: `output_std` against its healthy value 1/√d, and the
effective ranks of z and h (`models.siamese`).
"""
from __future__ import annotations

import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from models import siamese
from train_lib import cli

COMMAND = "train_lib.selfsup.probe"


def linear_probe_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> float:
    from sklearn.linear_model import LogisticRegression

    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    model = LogisticRegression(max_iter=5000).fit((train_x - mean) / std, train_y)
    return float(model.score((test_x - mean) / std, test_y))


def knn_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, *, k: int) -> float:
    """Majority vote of the k training neighbours by cosine similarity; ties to the larger summed similarity."""
    def unit(x):
        x = np.asarray(x, np.float64)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    similarity = unit(test_x) @ unit(train_x).T
    k = min(k, len(train_x))
    neighbours = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    votes = np.zeros((len(test_x), num_classes))
    weight = np.zeros((len(test_x), num_classes))
    rows = np.arange(len(test_x))[:, None]
    np.add.at(votes, (rows, train_y[neighbours]), 1.0)
    np.add.at(weight, (rows, train_y[neighbours]), similarity[rows, neighbours])
    predicted = np.argmax(votes + weight / (2.0 * k + 1.0), axis=1)  # |summed similarity| ≤ k: only breaks ties
    return float(np.mean(predicted == test_y))


def _outputs(task, params, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(h, z) of the online network on `images` in one batch (the projector's batch norm sees the split)."""
    h, z, _ = jax.jit(task.model.apply)({"params": params["online"]}, jnp.asarray(images))
    return np.asarray(h), np.asarray(z)


def evaluate(task, params) -> dict[str, float]:
    """Probe, k-NN and the collapse diagnostics on the test split, from host or device `params`."""
    data = task.data
    train_h, train_z = _outputs(task, params, data.train_images)
    test_h, test_z = _outputs(task, params, data.test_images)
    k = task.probe.knn_k
    return {
        "linear_probe_accuracy": linear_probe_accuracy(train_h, data.train_labels, test_h, data.test_labels),
        "knn_accuracy": knn_accuracy(train_h, data.train_labels, test_h, data.test_labels, k=k),
        "knn_accuracy_projection": knn_accuracy(train_z, data.train_labels, test_z, data.test_labels, k=k),
        "output_std": float(siamese.normalized_std(test_z)),
        "output_std_healthy": 1.0 / float(np.sqrt(test_z.shape[1])),
        "output_rank": float(siamese.effective_rank(test_z)),
        "representation_rank": float(siamese.effective_rank(test_h)),
        "knn_k": k,
    }


def format_results(results: dict[str, float]) -> str:
    return (f"test split: linear probe {100 * results['linear_probe_accuracy']:.1f}%, {results['knn_k']}-NN "
            f"{100 * results['knn_accuracy']:.1f}% (on z: {100 * results['knn_accuracy_projection']:.1f}%); "
            f"std of normalised z {results['output_std']:.4f} (healthy 1/√d = {results['output_std_healthy']:.4f}), "
            f"effective rank of z {results['output_rank']:.1f}, of h {results['representation_rank']:.1f}")


def main(argv: list[str]) -> None:
    flags.DEFINE_string("workdir", None, "Training workdir of a 'siamese' task whose newest checkpoint to evaluate.")
    flags.DEFINE_bool("use_ema", True, "The trainer's EMA parameters when the run kept them (ema_decay > 0).")
    flags.DEFINE_string("output", None, "Optional JSON file for the results.")
    cli.parse_flags(argv)
    f = flags.FLAGS
    if not f.workdir:
        cli.fail("--workdir is required, e.g. --workdir=runs/simsiam_digits")

    def body():
        from train_lib import checkpointing

        run = checkpointing.restore_params(f.workdir, use_ema=f.use_ema, command=COMMAND)
        results = {"step": run.step, **evaluate(run.task, run.params)}
        print(f"# checkpoint step {run.step} ({'EMA' if run.ema else 'raw'} parameters), {f.workdir}")
        print(format_results(results))
        if f.output:
            pathlib.Path(f.output).write_text(json.dumps(results, indent=2) + "\n")

    cli.run_guarded(body)


if __name__ == "__main__":
    main(sys.argv)

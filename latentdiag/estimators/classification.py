"""Classification accuracy of a model's own classifier q(y | x), and the rate per class.

For models that offer the capability ``classify(x)`` (log q(y | x) or logits, shape (B, K)), such as the
semi-supervised M2 LPVAE (:class:`latentdiag.models.M2LPVAE`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from latentdiag._batching import DataLike, iter_batches
from latentdiag._runtime import check_model_on, evaluation, resolve_device
from latentdiag._validation import check_int, check_seed
from latentdiag.adapters.protocol import UnsupportedModelError, require_capability
from latentdiag.estimators._common import mean_and_stderr
from latentdiag.estimators.encoded import as_table
from latentdiag.results import Estimate

__all__ = ["classification_accuracy", "rate_per_class"]


def classification_accuracy(model: Any, data: DataLike, *, batch_size: int = 256, device: Any = None,
                            progress: bool = False, seed: int | None = None) -> Estimate:
    """Accuracy of the model's classifier, (1/N) sum_n [argmax_y q(y | x_n) = y_n], on labelled data.

    The standard error is the binomial one over datapoints, sqrt(p (1 - p) / (N - 1)) (std(ddof=1) / sqrt(N) of
    the 0/1 outcomes); it describes the test set's sampling, not the spread over training runs. ``extra`` holds
    the per-class accuracies (``class_<k>``) and the mean predicted probability of the true class
    (``mean_true_class_probability``). ``seed`` is accepted for a uniform signature; the pass is deterministic.

    Raises
    ------
    UnsupportedModelError
        The model has no ``classify(x)``, or the data carry no labels.
    """
    require_capability(model, "classify", needed_by="classification_accuracy")
    batch_size = check_int("batch_size", batch_size)
    run_device = resolve_device(device, model)
    if device is not None:
        check_model_on(model, run_device)
    correct, truth, true_prob = [], [], []
    with evaluation(model):
        for batch in iter_batches(data, batch_size=batch_size, device=run_device):
            if batch.y is None:
                raise UnsupportedModelError("classification_accuracy needs labelled data; the data carry no labels")
            scores = model.classify(batch.x).float()
            if scores.ndim != 2 or scores.shape[0] != batch.x.shape[0]:
                raise ValueError(f"model.classify(x) must return (B, K) scores for a batch of {batch.x.shape[0]}; "
                                 f"got shape {tuple(scores.shape)}.")
            y = batch.y.long()
            if int(y.min()) < 0 or int(y.max()) >= scores.shape[1]:
                raise ValueError(f"labels must be class indices 0..{scores.shape[1] - 1} (model.classify gives "
                                 f"{scores.shape[1]} classes); got values in [{int(y.min())}, {int(y.max())}].")
            correct.append((scores.argmax(-1) == y).cpu())
            true_prob.append(torch.log_softmax(scores, -1).gather(1, y[:, None])[:, 0].exp().cpu())
            truth.append(y.cpu())
    hits = torch.cat(correct).numpy().astype(np.float64)
    labels = torch.cat(truth).numpy()
    value, stderr = mean_and_stderr(hits)
    extra: dict[str, float] = {"mean_true_class_probability": float(torch.cat(true_prob).double().mean())}
    for k in np.unique(labels).tolist():
        extra[f"class_{k}"] = float(hits[labels == k].mean())
    return Estimate(name="classification_accuracy", value=value, stderr=stderr, n=int(hits.size), unit="accuracy",
                    estimator="argmax of the model's classifier q(y|x) against the labels; binomial standard "
                              "error over datapoints",
                    settings={"batch_size": batch_size, "device": str(run_device)},
                    extra=extra, per_datapoint=hits)


def rate_per_class(model_or_table: Any, data: DataLike | None = None, *, batch_size: int | None = None,
                   kl_samples: int | None = None, device: Any = None, progress: bool = False,
                   seed: int | None = 0) -> Estimate:
    """The rate KL(q(z | x) || p(z)) averaged within each true class, R_k = (1/N_k) sum_{n: y_n = k} KL_n.

    ``value`` is the class-balanced rate (1/K) sum_k R_k with standard error sqrt(sum_k se_k^2) / K (classes are
    independent samples); ``extra`` holds ``class_<k>``, ``class_<k>_stderr`` and ``class_<k>_n``. The per-datapoint
    KL is the table's (analytic, or Monte Carlo for e.g. mixture posteriors: see ``settings["kl_method"]``).

    ``model_or_table``: a model and labelled ``data`` (encoded once with :func:`latentdiag.encode` and the encoder
    options) or an :class:`EncodedTable` of labelled data.

    Raises
    ------
    UnsupportedModelError
        The table carries no labels (or one class only).
    """
    table = as_table(model_or_table, data, batch_size=batch_size, kl_samples=kl_samples, device=device,
                     progress=progress, seed=check_seed("seed", seed, allow_none=True))
    if table.labels is None or int(torch.unique(table.labels).numel()) < 2:
        raise UnsupportedModelError("rate_per_class needs data with class labels (at least two classes)")
    labels = table.labels.cpu().numpy()
    kl = np.asarray(table.kl, dtype=np.float64)
    extra: dict[str, float] = {}
    means, variances = [], []
    for k in np.unique(labels).tolist():
        mean, se = mean_and_stderr(kl[labels == k])
        extra[f"class_{k}"], extra[f"class_{k}_stderr"] = mean, se
        extra[f"class_{k}_n"] = float((labels == k).sum())
        means.append(mean)
        variances.append(se ** 2)
    classes = len(means)
    return Estimate(name="rate_per_class", value=float(np.mean(means)),
                    stderr=float(np.sqrt(np.sum(variances)) / classes), n=int(kl.size), unit="nats",
                    estimator="mean KL(q(z|x) || p(z)) within each true class; value: their class-balanced mean",
                    settings={"kl_method": table.kl_method, "classes": classes}, extra=extra)

"""Semi-supervised training of the M2 LPVAE: a class-balanced labelled subset, labelled and unlabelled batches, and
the objective of Zhang et al. (2022), eq. 11 (Kingma et al. 2014, eq. 9).

Objective (maximised; the loss is its negative), for N labelled pairs (x_n, y_n) and M unlabelled x_m:

    J = (1/N) sum_n ELBO(x_n, y_n) + (1/M) sum_m ELBO(x_m) + alpha (1/N) sum_n log q(y_n | x_n),
    alpha = r (N + M) / M,  r = 0.1 (the supervision rate of Kingma et al. and Zhang et al.).

Each optimiser step estimates the three means without bias by batch means: an unlabelled batch of ``batch_size``
and a labelled batch of ``labelled_batch_size`` (default: the same size, the two halves of the paper's step; eq. 11
weights the two sets by their means, so the ratio of batch sizes changes the noise, not the target). An epoch is
one pass over the unlabelled set (a ragged last batch dropped); the labelled set is cycled, reshuffled on every
pass. With every label given (M = 0) the unlabelled term is absent and alpha must be given.

The labelled subset is drawn once from ``label_seed`` (default: the run's seed), ``labels / K`` datapoints per class
(:func:`labelled_subset`), and recorded in the checkpoint (``training["labelled_indices"]``) with the rest of the
training state. Monitoring: the classifier's accuracy on the test split (:func:`latentdiag.estimators.
classification.classification_accuracy`) after every ``monitor_every`` epochs.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from latentdiag._random import stream_seed, torch_generator
from latentdiag._runtime import resolve_device
from latentdiag._validation import check_int, check_positive_float

__all__ = ["SUPERVISION_RATE", "SEMI_SUPERVISED_MODELS", "PAPER_SCHEDULE", "CPU_SCALE", "labelled_subset",
           "supervision_weight", "m2_loss", "train_semi_supervised", "train_reference_semi_supervised",
           "refuse_resume"]

#: r of alpha = r (N + M) / M (Kingma et al. 2014; Zhang et al. 2022, Section 6).
SUPERVISION_RATE = 0.1
#: Registry names of the models this trainer trains.
SEMI_SUPERVISED_MODELS: tuple[str, ...] = ("m2_lpvae",)


def labelled_subset(y: torch.Tensor, labels: int, *, num_classes: int, seed: int = 0) -> torch.Tensor:
    """Indices (sorted) of a class-balanced labelled subset: ``labels / num_classes`` datapoints of every class,
    drawn without replacement from a generator seeded by ``seed`` (the same seed gives the same subset).

    Raises
    ------
    ValueError
        ``labels`` is not a positive multiple of ``num_classes``, is larger than the training set, or asks for more
        of a class than the training set holds (no rounding: the subset is exactly what was asked for).
    """
    labels = check_int("labels", labels)
    num_classes = check_int("num_classes", num_classes, minimum=2)
    y = torch.as_tensor(y).long().reshape(-1)
    if labels > y.numel():
        raise ValueError(f"labels must be at most the size of the training set ({y.numel()}); got {labels}.")
    if labels % num_classes:
        raise ValueError(f"labels must be a multiple of the number of classes ({num_classes}), so that the "
                         f"labelled subset is class-balanced; got {labels} (e.g. {labels // num_classes * num_classes} "
                         f"or {(labels // num_classes + 1) * num_classes}).")
    per_class = labels // num_classes
    counts = torch.bincount(y, minlength=num_classes)
    short = [(k, int(c)) for k, c in enumerate(counts.tolist()) if c < per_class]
    if short:
        listed = ", ".join(f"class {k}: {c}" for k, c in short[:5])
        raise ValueError(f"labels={labels} needs {per_class} datapoints of every class; the training set has fewer "
                         f"({listed}).")
    gen = torch_generator(seed, "semi_supervised.labelled_subset")
    picked = []
    for k in range(num_classes):
        members = (y == k).nonzero()[:, 0]
        picked.append(members[torch.randperm(members.numel(), generator=gen)[:per_class]])
    return torch.cat(picked).sort().values


def supervision_weight(labelled: int, unlabelled: int, rate: float = SUPERVISION_RATE) -> float:
    """alpha = r (N + M) / M (Zhang et al. 2022, eq. 11 and below; Kingma et al. 2014 with the objective divided
    by M). Undefined with no unlabelled data (M = 0): a ValueError asks for alpha."""
    labelled, unlabelled = check_int("labelled", labelled), check_int("unlabelled", unlabelled, minimum=0)
    rate = check_positive_float("rate", rate)
    if unlabelled == 0:
        raise ValueError("alpha = r (N + M) / M is undefined with every label given (M = 0 unlabelled datapoints); "
                         "pass alpha explicitly.")
    return rate * (labelled + unlabelled) / unlabelled


def m2_loss(model: Any, x_labelled: torch.Tensor, y_labelled: torch.Tensor, x_unlabelled: torch.Tensor | None,
            alpha: float, *, eps_labelled: torch.Tensor | None = None,
            eps_unlabelled: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The negative of eq. 11 on one step's batches: -(mean ELBO(x_l, y_l) + mean ELBO(x_u) + alpha mean
    log q(y_l | x_l)), and its parts (``labelled_neg_elbo``, ``unlabelled_neg_elbo``, ``cross_entropy``,
    ``accuracy`` of the labelled batch) as floats. ``x_unlabelled`` None: the unlabelled term is dropped."""
    elbo_l = model.labelled_elbo(x_labelled, y_labelled, eps_labelled)
    log_qy = model.classify(x_labelled)
    log_q_true = log_qy.gather(1, y_labelled.long()[:, None])[:, 0]
    objective = elbo_l.mean() + alpha * log_q_true.mean()
    parts = {"labelled_neg_elbo": float(-elbo_l.mean().detach()), "cross_entropy": float(-log_q_true.mean().detach()),
             "accuracy": float((log_qy.argmax(-1) == y_labelled).float().mean())}
    if x_unlabelled is not None:
        elbo_u = model.unlabelled_elbo(x_unlabelled, eps_unlabelled)
        objective = objective + elbo_u.mean()
        parts["unlabelled_neg_elbo"] = float(-elbo_u.mean().detach())
    return -objective, parts


def _labels_of(data: Any, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = (data, None) if isinstance(data, torch.Tensor) else (getattr(data, "x", None), getattr(data, "y", None))
    if x is None and isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = data
    if not isinstance(x, torch.Tensor) or x.ndim < 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must be labelled data: an (x, y) tuple or a DataSplit with non-empty x; got "
                         f"{type(data).__name__}.")
    if not isinstance(y, torch.Tensor) or y.shape != (x.shape[0],) or y.is_floating_point():
        raise ValueError(f"{name} carries no class labels (y: {type(y).__name__}"
                         f"{tuple(y.shape) if isinstance(y, torch.Tensor) else ''}); a semi-supervised model needs "
                         "one integer label per training datapoint (e.g. --data mnist5k, mnist:DIR or cifar10:DIR).")
    return x, y.long()


def train_semi_supervised(model: nn.Module | Mapping[str, Any], train_data: Any, *, labels: int, epochs: int,
                          test_data: Any = None, batch_size: int | None = None,
                          labelled_batch_size: int | None = None, lr: float | None = None,
                          alpha: float | None = None, rate: float = SUPERVISION_RATE, seed: int | None = None,
                          label_seed: int | None = None, device: Any = "auto",
                          checkpoint: str | os.PathLike | None = None,
                          data_info: Mapping[str, Any] | None = None, monitor_every: int = 1,
                          augment: str | None = None,
                          callback: Callable[[dict[str, Any]], None] | None = None):
    """Train a semi-supervised model (M2, :class:`latentdiag.models.M2LPVAE`) with Adam on eq. 11.

    Parameters
    ----------
    model : nn.Module or mapping
        A model built with :func:`latentdiag.models.build_model`, or its configuration (built here from ``seed``).
    train_data : (x, y) or DataSplit
        The whole training set with its labels; ``labels`` of them keep their label, the rest are unlabelled.
    labels : int
        N, the size of the class-balanced labelled subset (a multiple of the number of classes).
    epochs : int
        Passes over the unlabelled set (over the labelled set when every label is given).
    batch_size, labelled_batch_size : int
        Unlabelled and labelled batch per step (default 16 and ``batch_size``: the paper's batch of 16).
    lr : float
        Adam learning rate (default 3e-4, the trainer's; Section 6 states none).
    alpha, rate : float
        The cross-entropy weight; default alpha = rate (N + M) / M (:func:`supervision_weight`).
    seed, label_seed : int
        ``seed`` seeds the initialisation, the batch order and the noise; ``label_seed`` (default ``seed``) the
        labelled subset.
    augment : {"none", "flip_crop"}
        Training-time augmentation of both batches (:func:`latentdiag.train.trainer.flip_crop`, for CIFAR-10).
    checkpoint : path, optional
        Written after every epoch with the labelled indices, settings and history (``training``).

    Returns
    -------
    latentdiag.train.trainer.TrainResult
        History records: ``epoch``, ``step``, ``train_loss``, ``train_labelled_neg_elbo``,
        ``train_unlabelled_neg_elbo``, ``train_cross_entropy``, ``train_accuracy``, ``seconds``,
        ``images_per_s`` and, when monitored, ``test_accuracy`` and ``test_accuracy_stderr``.
    """
    from latentdiag.estimators.classification import classification_accuracy
    from latentdiag.models.checkpoint import save_checkpoint
    from latentdiag.models.registry import build_model, model_config
    from latentdiag.train.trainer import AUGMENTATIONS, TrainResult, flip_crop
    from latentdiag._validation import check_choice

    epochs = check_int("epochs", epochs)
    monitor_every = check_int("monitor_every", monitor_every)
    batch_size = check_int("batch_size", batch_size if batch_size is not None else 16, minimum=2)
    labelled_batch_size = check_int("labelled_batch_size", labelled_batch_size if labelled_batch_size is not None
                                    else batch_size)
    lr = check_positive_float("lr", lr if lr is not None else 3e-4)
    seed = check_int("seed", seed if seed is not None else 0, minimum=0)
    label_seed = check_int("label_seed", label_seed if label_seed is not None else seed, minimum=0)
    augment = check_choice("augment", augment if augment is not None else "none", AUGMENTATIONS)
    x_all, y_all = _labels_of(train_data, "train_data")
    if test_data is not None:
        _labels_of(test_data, "test_data")
    run_device = resolve_device(device)
    if isinstance(model, Mapping):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(stream_seed(seed, "train.init"))
            model = build_model(model)
    if not callable(getattr(model, "labelled_elbo", None)) or not callable(getattr(model, "classify", None)):
        raise TypeError(f"model must be a semi-supervised model (labelled_elbo, unlabelled_elbo, classify), such as "
                        f"'m2_lpvae'; got {type(model).__name__}.")
    classes = int(model.num_classes)
    if int(y_all.max()) >= classes or int(y_all.min()) < 0:
        raise ValueError(f"train_data labels must lie in 0..{classes - 1} (the model's num_classes); got "
                         f"[{int(y_all.min())}, {int(y_all.max())}].")
    labelled_idx = labelled_subset(y_all, labels, num_classes=classes, seed=label_seed)
    mask = torch.ones(x_all.shape[0], dtype=torch.bool)
    mask[labelled_idx] = False
    unlabelled_idx = mask.nonzero()[:, 0]
    n_l, n_u = int(labelled_idx.numel()), int(unlabelled_idx.numel())
    if alpha is None:
        alpha = supervision_weight(n_l, n_u, rate)
    alpha = check_positive_float("alpha", alpha)
    if checkpoint is not None and model_config(model) is None:
        raise ValueError("checkpoint needs a model built with latentdiag.models.build_model; pass the configuration.")
    model.to(run_device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    data_gen, noise_gen = torch_generator(seed, "train.data_order"), torch_generator(seed, "train.noise")
    settings = {"semi_supervised": True, "labels": n_l, "unlabelled": n_u, "label_seed": label_seed,
                "batch_size": batch_size, "labelled_batch_size": labelled_batch_size, "lr": lr, "alpha": alpha,
                "rate": rate, "seed": seed, "augment": augment, "device": str(run_device), "epochs": epochs,
                "monitor_every": monitor_every, "world_size": 1, "amp": False}
    latent_dim = int(model.latent_dim)
    x_l, y_l = x_all[labelled_idx], y_all[labelled_idx]
    x_u = x_all[unlabelled_idx]
    pool: list[torch.Tensor] = []

    def labelled_batch() -> torch.Tensor:
        # cycle the labelled set, reshuffled on every pass; a batch may straddle two passes
        need = labelled_batch_size
        out = []
        while need:
            if not pool:
                pool.extend(torch.randperm(n_l, generator=data_gen).split(1))
            take = min(need, len(pool))
            out += pool[:take]
            del pool[:take]
            need -= take
        return torch.cat(out)

    def prepare(x: torch.Tensor) -> torch.Tensor:
        return (flip_crop(x, data_gen) if augment == "flip_crop" else x).to(run_device)

    history: list[dict[str, Any]] = []
    ckpt_path = Path(checkpoint) if checkpoint is not None else None
    step = 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stream_seed(seed, "train.torch_global"))
        for epoch in range(1, epochs + 1):
            model.train()
            t0 = time.perf_counter()
            if n_u:
                order = torch.randperm(n_u, generator=data_gen)  # rows of x_u
                steps = [idx for idx in order.split(batch_size) if idx.numel() == batch_size]
            else:  # every label given: an epoch is a pass over the labelled set
                steps = [None] * max(1, n_l // labelled_batch_size)
            if not steps:
                raise ValueError(f"no training batch: {n_u} unlabelled datapoints is fewer than "
                                 f"batch_size={batch_size}.")
            sums: dict[str, float] = {}
            for idx in steps:
                li = labelled_batch()
                xl, yl = prepare(x_l[li]), y_l[li].to(run_device)
                xu = prepare(x_u[idx]) if idx is not None else None
                eps_l = torch.randn(xl.shape[0], latent_dim, generator=noise_gen).to(run_device)
                eps_u = torch.randn(xu.shape[0], latent_dim, generator=noise_gen).to(run_device) \
                    if xu is not None else None
                loss, parts = m2_loss(model, xl, yl, xu, alpha, eps_labelled=eps_l, eps_unlabelled=eps_u)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                if not math.isfinite(float(loss.detach())):
                    raise ArithmeticError(f"the semi-supervised loss became non-finite at step {step} (epoch "
                                          f"{epoch}); lower --lr.")
                for key, value in (("loss", float(loss.detach())), *parts.items()):
                    sums[key] = sums.get(key, 0.0) + value
            seconds = time.perf_counter() - t0
            record: dict[str, Any] = {"epoch": epoch, "epochs": epochs, "step": step,
                                      **{f"train_{k}": v / len(steps) for k, v in sums.items()},
                                      "seconds": seconds,
                                      "images_per_s": len(steps) * (batch_size * (n_u > 0) + labelled_batch_size)
                                      / seconds}
            if test_data is not None and (epoch % monitor_every == 0 or epoch == epochs):
                acc = classification_accuracy(model, test_data, device=run_device)
                record.update(test_accuracy=acc.value, test_accuracy_stderr=acc.stderr, test_n=acc.n)
            history.append(record)
            if ckpt_path is not None:
                training = {"epoch": epoch, "step": step, "optimizer": opt.state_dict(), "history": history,
                            "settings": settings, "labelled_indices": labelled_idx.tolist()}
                save_checkpoint(ckpt_path, model, data=data_info, training=training)
            if callback is not None:
                callback(dict(record))
    model.eval()
    notes = (f"semi-supervised: {n_l} labelled ({n_l // classes} per class, label_seed {label_seed}), {n_u} "
             f"unlabelled, alpha = {alpha:.4g}",)
    return TrainResult(model=model, history=history, checkpoint=ckpt_path, settings=settings, notes=notes)


#: The paper's schedule (Zhang et al. 2022, Section 6, MNIST: 50 epochs, batch size 16), the default on full data.
PAPER_SCHEDULE: dict[str, int] = {"epochs": 50, "batch_size": 16}
#: The CPU-scale default on the bundled data (mnist5k, digits): a small decoder and Bernoulli pixels, a run of a
#: few minutes on two CPU cores (docs/training.md records one); every entry can be overridden.
CPU_SCALE: dict[str, Any] = {"epochs": 1, "batch_size": 64, "likelihood": "bernoulli",
                             "model": {"hidden": 256, "cond_channels": 4, "channels": 16, "res_blocks": 0}}
_BUNDLED = ("mnist5k", "digits")


def refuse_resume(raw: Mapping[str, Any], labels: int | None) -> None:
    """A ValueError for ``resume`` of a semi-supervised checkpoint (not supported yet), or ``labels`` with one."""
    if (raw.get("model") or {}).get("name") in SEMI_SUPERVISED_MODELS:
        raise ValueError("resume: the checkpoint holds a semi-supervised model (m2_lpvae), whose runs cannot be "
                         "resumed yet; start a new run (its labelled subset is recorded in the checkpoint).")
    if labels is not None:
        raise ValueError("labels does not apply with resume: a resumed run continues an unsupervised model.")


def train_reference_semi_supervised(model: str = "m2_lpvae", *, labels: int | None, horizon: int | str = 1,
                                    latent_dim: int | None = None, likelihood: str | None = None,
                                    model_options: Mapping[str, Any] | None = None, data: str | None = None,
                                    data_dir: str | os.PathLike | None = None, objective: Any = None,
                                    epochs: int | None = None, batch_size: int | None = None,
                                    lr: float | None = None, seed: int | None = None, device: Any = "auto",
                                    out: str | os.PathLike | None = None,
                                    callback: Callable[[dict[str, Any]], None] | None = None):
    """What ``latentdiag train --model m2_lpvae --labels N`` runs: load the data with their labels
    (:func:`latentdiag.train.trainer.load_training_data`: ``mnist5k`` by default, ``digits``, ``mnist:DIR``,
    ``cifar10:DIR``), build ``m2_lpvae`` for the data's shape and levels, and :func:`train_semi_supervised`.

    Defaults: on full data (``mnist:DIR``, ``cifar10``) the paper's model and schedule (:data:`PAPER_SCHEDULE`);
    on the bundled data the CPU scale (:data:`CPU_SCALE`). Explicit arguments win over both.
    """
    from latentdiag.models.pixelcnn import check_horizon
    from latentdiag.train.trainer import load_training_data

    if model not in SEMI_SUPERVISED_MODELS:
        raise ValueError(f"labels applies only to the semi-supervised models {list(SEMI_SUPERVISED_MODELS)}; got "
                         f"model {model!r} (drop labels, or use model='m2_lpvae').")
    if labels is None:
        raise ValueError(f"{model} is semi-supervised: labels (the size of the class-balanced labelled subset, "
                         "e.g. 100) is required.")
    if objective not in (None, "elbo") and not (isinstance(objective, Mapping) and dict(objective) == {"name": "elbo"}):
        raise ValueError(f"objective does not apply to {model}: it trains the semi-supervised bound (eq. 11 of "
                         f"Zhang et al. 2022); got {objective!r}.")
    name = data or "mnist5k"
    if name == "topics" or name.startswith("text:"):
        raise ValueError(f"data {name!r} carries no class labels; {model} needs labelled images (mnist5k, digits, "
                         "mnist:DIR or cifar10:DIR).")
    cpu = name in _BUNDLED
    likelihood = likelihood or (CPU_SCALE["likelihood"] if cpu else "categorical")
    loaded = load_training_data(name, likelihood=likelihood, data_dir=data_dir)
    kwargs: dict[str, Any] = {**(CPU_SCALE["model"] if cpu else {}), **dict(model_options or {})}
    kwargs.update(horizon=check_horizon(horizon), likelihood=likelihood, input_shape=list(loaded["input_shape"]),
                  levels=loaded["levels"], num_classes=int(loaded["train"].num_classes))
    if latent_dim is not None:
        kwargs["latent_dim"] = latent_dim
    schedule = {"epochs": CPU_SCALE["epochs"], "batch_size": CPU_SCALE["batch_size"]} if cpu else PAPER_SCHEDULE
    augment = loaded["augment"] if loaded["augment"] != "none" else None
    info = {**loaded["info"], "labels": labels}
    return train_semi_supervised({"name": model, "kwargs": kwargs}, loaded["train"], labels=labels,
                                 test_data=loaded["test"], epochs=epochs or schedule["epochs"],
                                 batch_size=batch_size or schedule["batch_size"], lr=lr, seed=seed, device=device,
                                 checkpoint=out, data_info=info, augment=augment, callback=callback)

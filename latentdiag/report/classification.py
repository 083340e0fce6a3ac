"""Report metrics of models with their own classifier (capability ``classify``, e.g. the semi-supervised M2
LPVAE): its accuracy on the evaluated (test) split, and the rate within each true class. Registered in
:data:`latentdiag.report.runner.METRICS` (there, with :func:`~latentdiag.report.runner.metric`) as
``classification_accuracy`` and ``rate_per_class`` (needs ``classify``). The math lives in
:mod:`latentdiag.estimators.classification`; these functions only call it."""

from __future__ import annotations

from typing import Any

__all__ = ["run_classification_accuracy", "run_rate_per_class"]


def run_classification_accuracy(ctx: Any) -> tuple[list, dict[str, Any]]:
    """classification_accuracy on the report's data (it needs their labels); per-class accuracies as a plot."""
    from latentdiag.estimators.classification import classification_accuracy

    est = classification_accuracy(ctx.model, ctx.data, device=ctx.device, progress=ctx.progress)
    per_class = {k[len("class_"):]: v for k, v in est.extra.items() if k.startswith("class_")}
    return [est], {"accuracy_per_class": per_class}


def run_rate_per_class(ctx: Any) -> tuple[list, dict[str, Any]]:
    """rate_per_class from the report's encoded table (labels needed)."""
    from latentdiag.estimators.classification import rate_per_class

    est = rate_per_class(ctx.table())
    per_class = {k[len("class_"):]: v for k, v in est.extra.items()
                 if k.startswith("class_") and not k.endswith(("_stderr", "_n"))}
    return [est], {"rate_per_class": per_class}

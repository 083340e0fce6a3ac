"""Studies: the findings of the papers this toolkit is built from, reproduced with its own trainer and estimators.

``latentdiag study NAME`` / :func:`run_study`. Each study trains the models it needs (resuming from ``out``),
measures them, and writes study.json, study.md and study.html, each trend of the paper marked holds / does not
hold with the standard errors behind the word. Recorded runs: ``docs/studies/``.

Also here, built from the estimators' public functions (and re-exported by :mod:`latentdiag`): the representation
table of Zhang et al. (:mod:`latentdiag.studies.representation_table`) and the multi-model comparison of aggregate
posteriors (:mod:`latentdiag.studies.compare`). The estimators import nothing from this package.
"""

from __future__ import annotations

from latentdiag.studies.base import Measure, ModelRun, Study, Summary, Trend
from latentdiag.studies.horizons import Horizons
from latentdiag.studies.lossy_code import LossyCode
from latentdiag.studies.rate_constraints import RateConstraints
from latentdiag.studies.runner import StudyResult, StudySettingsError, resolve_study, run_study, study_settings

STUDIES: dict[str, Study] = {s.name: s for s in (Horizons(), RateConstraints(), LossyCode())}

__all__ = ["STUDIES", "Measure", "ModelRun", "Study", "StudyResult", "StudySettingsError", "Summary", "Trend",
           "resolve_study", "run_study", "study_settings"]

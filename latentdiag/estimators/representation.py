"""Compatibility module: the old home of representations, intrinsic dimension and the representation table.

Issue 18 split it: :mod:`latentdiag.estimators.representations` (extract_representations, conditional_entropy,
Representations), :mod:`latentdiag.estimators.intrinsic_dimension` (IntrinsicDimension, intrinsic_dimension) and
the study :mod:`latentdiag.studies.representation_table` (representation_table, format_representation_table).
This module re-exports the old names so that user code importing from here keeps working; new code should import
from the modules above (or from :mod:`latentdiag`). The two study names are loaded lazily on first access, so that
importing this estimator module imports nothing from :mod:`latentdiag.studies`.
"""

from __future__ import annotations

from typing import Any

from latentdiag.estimators.intrinsic_dimension import ID_RULES, IntrinsicDimension, intrinsic_dimension
from latentdiag.estimators.representations import (REPRESENTATION_KINDS, Representations, conditional_entropy,
                                                   extract_representations)

__all__ = ["REPRESENTATION_KINDS", "ID_RULES", "IntrinsicDimension", "Representations", "conditional_entropy",
           "extract_representations", "format_representation_table", "intrinsic_dimension",
           "representation_table"]

_STUDY_NAMES = ("representation_table", "format_representation_table")


def __getattr__(name: str) -> Any:
    """Compatibility shim: the study names now live in :mod:`latentdiag.studies.representation_table`."""
    if name in _STUDY_NAMES:
        import importlib

        return getattr(importlib.import_module("latentdiag.studies.representation_table"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

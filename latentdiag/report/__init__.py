"""Rendering of estimator results (a terminal table and JSON until the full report lands)."""

from latentdiag.report.render import render_json, render_table

__all__ = ["render_json", "render_table"]

"""The report: run a chosen set of estimators on a model and data, and render the results (table, JSON, CSV,
Markdown, HTML with plots). It computes no math itself."""

from latentdiag.report.render import (
    SCHEMA_VERSION,
    render_csv,
    render_html,
    render_json,
    render_markdown,
    render_report_json,
    render_report_table,
    render_table,
    write_report,
)
from latentdiag.report.check import Gate
from latentdiag.report.runner import (DECOMPOSE_ROWS, METRICS, Metric, MetricContext, Report, metric, register_metric,
                                      resolve_metrics, run_report)
from latentdiag.report.source import LoadedModel, load_model

__all__ = ["DECOMPOSE_ROWS", "METRICS", "Gate", "LoadedModel", "Metric", "MetricContext", "Report", "SCHEMA_VERSION", "load_model",
           "metric", "register_metric", "render_csv", "render_html", "render_json", "render_markdown", "render_report_json",
           "render_report_table", "render_table", "resolve_metrics", "run_report", "write_report"]

"""The declarations behind the gate: every result of the registry's metrics declares its harmful direction, unit
and tolerance next to its metric, the report records them in report.json, and the names the docs list are the
registry's (generated, kept equal here)."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch

from latentdiag.data import digits
from latentdiag.models import build_model
from latentdiag.report import Metric, run_report
from latentdiag.report.check import Gate, compare_to_baseline, default_gated, exit_code, render_gates_markdown
from latentdiag.report.render import report_document
from latentdiag.report.runner import METRICS, declared_gates, register_metric
from latentdiag.results import Estimate

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
# declared ahead of the estimates that make them (the rate-split bracket), or made only by a slow metric
NOT_MADE_HERE = {"marginal_kl_mixed_membership"}  # opt-in (slow)


@pytest.fixture(scope="module")
def doc():
    torch.manual_seed(0)
    model = build_model({"name": "mlp_vae", "kwargs": {"input_shape": [1, 8, 8], "latent_dim": 3, "hidden": [16]}})
    data = digits("test", format="binary")
    data = dataclasses.replace(data, x=data.x[:120], y=data.y[:120])  # labels: the linear probe runs too
    rep = run_report(model.eval(), data, metrics=[m for m in METRICS if m != "mixed_membership"], iw_samples=5,
                     device="cpu")
    return json.loads(json.dumps(report_document(rep), allow_nan=False))


def test_every_result_records_its_declared_gate(doc):
    assert doc["results"] and not {"decoding", "linear_probe"} & set(doc["skipped"])
    declared = declared_gates()
    for r in doc["results"]:
        gates = r["gates"]
        assert "value" in gates, f"{r['name']} declares no gate"
        assert Gate.from_dict(gates["value"]) == declared[r["name"]][1]
        assert gates["value"]["unit"] == r["unit"]
        for key in gates:
            if key != "value":
                assert key in r["extra"] and declared[f"{r['name']}.{key}"][1].to_dict() == gates[key]


def test_every_declaration_is_made_by_its_metric(doc):
    made = {r["name"] for r in doc["results"]}
    made |= {f"{r['name']}.{k}" for r in doc["results"] for k in r["extra"]}
    assert set(declared_gates()) - made == NOT_MADE_HERE


def test_a_saved_report_is_checked_from_its_record_alone(doc, monkeypatch):
    import latentdiag.report.runner as runner

    made = {r["name"] for r in doc["results"]} | {f"{r['name']}.{k}" for r in doc["results"] for k in r["extra"]}
    outcomes = compare_to_baseline(doc, doc)
    assert sorted(o.metric for o in outcomes) == sorted(ref for ref in default_gated() if ref in made)
    assert len(outcomes) >= 8 and exit_code(outcomes) == 0
    assert {o.verdict for o in outcomes} == {"within_noise"}
    monkeypatch.setattr(runner, "METRICS", {})  # no registry: the record in report.json alone
    alone = compare_to_baseline(doc, doc)
    assert [(o.metric, o.direction, o.tolerance) for o in alone] == [
        (o.metric, o.direction, o.tolerance) for o in outcomes]


def test_declared_unit_must_be_the_estimators(doc):
    def run(ctx):
        return [Estimate(name="my_thing", value=1.0, stderr=0.1, n=2, unit="bits", estimator="x")], {}

    register_metric(Metric("my_thing", "a test metric", run, default=False,
                           gates={"my_thing": Gate("up", "nats")}))
    try:
        model = build_model({"name": "mlp_vae", "kwargs": {"input_shape": [1, 8, 8], "latent_dim": 2,
                                                           "hidden": [8]}})
        with pytest.raises(ValueError, match="declares my_thing in 'nats', but its estimator reports 'bits'"):
            run_report(model, digits("test", format="binary").x[:10], metrics="my_thing", device="cpu")
    finally:
        METRICS.pop("my_thing")


def test_metric_gates_are_validated():
    noop = lambda ctx: ([], {})  # noqa: E731
    with pytest.raises(ValueError, match="gates key 'a b'"):
        Metric("m", "d", noop, gates={"a b": Gate("up", "")})
    with pytest.raises(TypeError, match=r"gates\['x'\] must be a Gate"):
        Metric("m", "d", noop, gates={"x": {"harmful": "up"}})
    with pytest.raises(TypeError, match="gates must be a dict"):
        Metric("m", "d", noop, gates=[("x", Gate("up", ""))])


@pytest.mark.parametrize("page", ["docs/ci.md", "docs/cli.md"])
def test_docs_list_the_registry_names(page):
    text = (ROOT / page).read_text()
    found = re.search(r"<!-- gates:begin.*?-->\n(.*?)<!-- gates:end -->", text, re.S)
    assert found, f"{page} has no generated gate table"
    assert found.group(1) == render_gates_markdown(), (
        f"{page}: the table of metric names is out of date; paste the output of "
        "python -c 'from latentdiag.report.check import render_gates_markdown; print(render_gates_markdown())'")
    # the names the rest of the page uses in rules and options are real
    names = {ref.partition(".")[0] for ref in declared_gates()}
    used = re.findall(r'--fail-if "([a-z_][a-z0-9_.]*)|--compare ([a-z_][a-z0-9_.]*)|--tolerance ([a-z_][a-z0-9_.]*)=',
                      text)
    assert used
    for ref in ("".join(groups) for groups in used):
        assert ref.partition(".")[0] in names, f"{page} names {ref!r}, which no metric makes"

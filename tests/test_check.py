"""The CI gate of ``latentdiag check``: rules, baseline regressions with standard errors, pyproject config, exit
codes, JUnit XML and the terminal table."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import xml.etree.ElementTree as ET

import pytest

from latentdiag.report.check import (
    BAD_DIRECTION,
    DEFAULT_Z,
    EXIT_NOTHING_EVALUATED,
    EXIT_OK,
    EXIT_RULE_FAILED,
    EXIT_RUNTIME,
    EXIT_USAGE,
    OPERATORS,
    CheckConfig,
    Rule,
    _toml_module,
    compare_to_baseline,
    evaluate_rules,
    exit_code,
    load_pyproject_rules,
    load_report,
    parse_rule,
    render_junit,
    render_outcomes_table,
)
from latentdiag.results import Estimate


# Python 3.10 reads TOML only with tomli installed; the pyproject tests need one of the two
needs_toml = pytest.mark.skipif(sys.version_info < (3, 11) and importlib.util.find_spec("tomli") is None,
                                reason="Python < 3.11 without tomli")


def est(name, value, stderr=0.05, *, unit="nats", extra=None, settings=None, n=1000):
    return Estimate(name=name, value=value, stderr=stderr, n=n, unit=unit, estimator="test",
                    settings=settings or {}, extra=extra or {}).to_dict()


def report(*results, skipped=None):
    doc = {"schema_version": "0.1", "provenance": {"seed": 0}, "results": list(results)}
    if skipped is not None:
        doc["skipped"] = skipped
    # round trip through JSON: what the CLI reads back from report.json (non-finite -> null)
    return json.loads(json.dumps(doc, allow_nan=False))


@pytest.fixture()
def doc():
    return report(
        est("rate", 5.0, 0.1),
        est("marginal_kl", 0.3, 0.02),
        est("iw_nll", 90.0, 0.5, extra={"bits_per_dim": 0.16, "bits_per_dim_stderr": 0.001, "perplexity": 2.0}),
        est("active_units", 7.0, float("nan"), unit="dimensions"),
        skipped={"mmd": "model has no prior sampler"},
    )


# ---------------------------------------------------------------------------------------------------------- parse
@pytest.mark.parametrize("text, metric, key, op, threshold", [
    ("rate<2.0", "rate", None, "<", 2.0),
    ("  marginal_kl >= 0.5 ", "marginal_kl", None, ">=", 0.5),
    ("iw_nll.bits_per_dim>1.5", "iw_nll", "bits_per_dim", ">", 1.5),
    ("elbo<=-1e2", "elbo", None, "<=", -100.0),
    ("active_units==3", "active_units", None, "==", 3.0),
    ("active_units != .5", "active_units", None, "!=", 0.5),
])
def test_parse_rule(text, metric, key, op, threshold):
    rule = parse_rule(text)
    assert (rule.metric, rule.key, rule.op, rule.threshold) == (metric, key, op, threshold)
    assert rule.ref == (metric if key is None else f"{metric}.{key}")
    assert " " not in rule.text and str(rule) == rule.text


@pytest.mark.parametrize("text, match", [
    ("rate 2.0", "no comparison operator"),
    ("", "no comparison operator"),
    ("rate=2", "use '=='"),
    ("rate=<2", "did you mean '<='"),
    ("rate<>2", "use '!='"),
    ("<2", "metric name is empty"),
    ("2.x<3", "is not a metric name"),
    ("rate.a.b<3", "is not a metric name"),
    ("rate<abc", "threshold 'abc' is not a number"),
    ("rate<", "threshold '' is not a number"),
    ("rate<nan", "must be finite"),
    ("rate<inf", "must be finite"),
])
def test_parse_rule_errors_name_the_rule_and_the_form(text, match):
    with pytest.raises(ValueError, match=match) as info:
        parse_rule(text)
    assert repr(text) in str(info.value) and "METRIC[.KEY] OP NUMBER" in str(info.value)


def test_parse_rule_type_error():
    with pytest.raises(TypeError, match="a rule must be a str"):
        parse_rule(2.0)


# -------------------------------------------------------------------------------------------------------- evaluate
@pytest.mark.parametrize("op, threshold, fails", [
    ("<", 5.5, True), ("<", 5.0, False), ("<", 4.5, False),
    ("<=", 5.0, True), ("<=", 4.99, False),
    (">", 4.5, True), (">", 5.0, False),
    (">=", 5.0, True), (">=", 5.01, False),
    ("==", 5.0, True), ("==", 5.1, False),
    ("!=", 5.1, True), ("!=", 5.0, False),
])
def test_each_operator_fails_when_its_condition_holds(doc, op, threshold, fails):
    [o] = evaluate_rules(doc, [f"rate{op}{threshold}"])
    assert o.status == ("failed" if fails else "passed")
    assert o.value == 5.0 and o.stderr == 0.1 and o.unit == "nats" and o.kind == "rule"
    assert exit_code([o]) == (EXIT_RULE_FAILED if fails else EXIT_OK)


def test_all_operators_covered():
    assert set(OPERATORS) == {"<", "<=", ">", ">=", "==", "!="}


def test_extra_lookup_reads_the_derived_scalar_and_its_stderr(doc):
    o, p, q = evaluate_rules(doc, ["iw_nll.bits_per_dim>0.15", "iw_nll.perplexity>=2.5", "iw_nll>100"])
    assert o.failed and o.value == 0.16 and o.stderr == 0.001 and o.unit == "bits/dim"
    assert o.metric == "iw_nll.bits_per_dim"
    assert p.passed and p.value == 2.0 and p.stderr is None
    assert q.passed and q.value == 90.0  # the top-level value, not an extra


def test_pseudo_fields_stderr_and_n(doc):
    o, p = evaluate_rules(doc, ["iw_nll.stderr>0.4", "rate.n<2000"])
    assert o.failed and o.value == 0.5
    assert p.failed and p.value == 1000


def test_missing_metric_is_an_error_with_did_you_mean_and_the_available_list(doc):
    o, ok = evaluate_rules(doc, ["rat<2", "rate<2"])
    assert o.error and o.error_kind == "missing"
    assert "Did you mean 'rate'?" in o.message
    assert "rate, marginal_kl, iw_nll, active_units" in o.message
    assert ok.passed
    assert exit_code([o, ok]) == EXIT_USAGE


def test_missing_extra_key_suggests_the_close_one(doc):
    [o] = evaluate_rules(doc, ["iw_nll.bits_per_dimm>1"])
    assert o.error and o.error_kind == "missing" and "iw_nll.bits_per_dim" in o.message


def test_skipped_metric_gives_the_reports_reason(doc):
    [o] = evaluate_rules(doc, ["mmd>0.1"])
    assert o.error and o.error_kind == "skipped" and "model has no prior sampler" in o.message


def test_null_metric_is_a_non_finite_error_and_exit_3(doc):
    doc["results"].append(est("elbo", float("nan"), float("nan")))
    assert doc["results"][-1]["value"] is None  # null in JSON
    o, ok = evaluate_rules(doc, ["elbo<-100", "rate<2"])
    assert o.error and o.error_kind == "non_finite" and "null" in o.message
    assert ok.passed
    assert exit_code([o, ok]) == EXIT_RUNTIME
    assert exit_code([o, ok], nofail=True) == EXIT_RUNTIME  # nofail does not hide errors
    # a failing rule does not mask the runtime error
    assert exit_code(evaluate_rules(doc, ["elbo<-100", "rate>2"])) == EXIT_RUNTIME


def test_in_memory_nan_counts_as_non_finite():
    doc = {"results": [{"name": "rate", "value": float("nan"), "stderr": 0.1}]}
    [o] = evaluate_rules(doc, ["rate<2"])
    assert o.error_kind == "non_finite"


def test_duplicate_metric_is_ambiguous():
    doc = report(est("rate", 1.0), est("rate", 2.0))
    [o] = evaluate_rules(doc, ["rate<2"])
    assert o.error and o.error_kind == "ambiguous"
    assert exit_code([o]) == EXIT_USAGE


def test_nothing_evaluated_is_4(doc):
    assert exit_code([]) == EXIT_NOTHING_EVALUATED
    assert exit_code(evaluate_rules(report(), ["rate<2", "elbo<0"])) == EXIT_NOTHING_EVALUATED  # empty report
    assert exit_code(evaluate_rules(doc, ["rat<2", "mmd>1"])) == EXIT_NOTHING_EVALUATED        # nothing matched
    assert exit_code(evaluate_rules(doc, [])) == EXIT_NOTHING_EVALUATED


def test_nofail_turns_only_failures_into_0(doc):
    outcomes = evaluate_rules(doc, ["rate>2", "marginal_kl>0.5"])
    assert exit_code(outcomes) == EXIT_RULE_FAILED
    assert exit_code(outcomes, nofail=True) == EXIT_OK


def test_near_threshold_is_said(doc):
    [o] = evaluate_rules(doc, ["rate<5.1"])
    assert o.failed and "within 2 standard errors" in o.message
    [o] = evaluate_rules(doc, ["rate<2"])
    assert "within 2 standard errors" not in o.message


def test_bad_report_document():
    with pytest.raises(TypeError, match="report dict"):
        evaluate_rules([1, 2], ["rate<2"])
    with pytest.raises(ValueError, match="'results' list"):
        evaluate_rules({"schema_version": "0.1"}, ["rate<2"])
    with pytest.raises(ValueError, match=r"results\[0\]"):
        evaluate_rules({"results": [{"value": 1.0}]}, ["rate<2"])


def test_malformed_rule_raises_before_anything_is_evaluated(doc):
    with pytest.raises(ValueError, match="'rate=<2'"):
        evaluate_rules(doc, ["marginal_kl>0.5", "rate=<2"])


def test_outcome_to_dict_is_json_safe(doc):
    outcomes = evaluate_rules(doc, ["rate<2", "active_units<3"])
    outcomes += compare_to_baseline(doc, doc)
    text = json.dumps([o.to_dict() for o in outcomes], allow_nan=False)
    back = json.loads(text)
    assert back[0]["threshold"] == 2.0 and back[0]["operator"] == "<" and back[0]["status"] == "passed"
    assert back[1]["stderr"] is None  # active_units has no standard error


# -------------------------------------------------------------------------------------------------------- baseline
def test_baseline_rate_drop_beyond_noise_fails_and_rise_does_not():
    base = report(est("rate", 5.0, 0.1))
    se = math.hypot(0.1, 0.1)
    drop = report(est("rate", 5.0 - 2.0 * se - 0.01, 0.1))
    [o] = compare_to_baseline(drop, base)
    assert o.failed and o.kind == "baseline" and o.direction == "down"
    assert o.delta == pytest.approx(-2.0 * se - 0.01)
    assert o.allowed == pytest.approx(DEFAULT_Z * se)
    assert o.z_score == pytest.approx(o.delta / se)
    assert "REGRESSED" in o.message and exit_code([o]) == EXIT_RULE_FAILED
    # the same move upwards is no regression for the rate
    rise = report(est("rate", 5.0 + 2.0 * se + 0.5, 0.1))
    [o] = compare_to_baseline(rise, base)
    assert o.passed and o.z_score > 2


def test_baseline_within_noise_passes():
    se = math.hypot(0.1, 0.1)
    base = report(est("rate", 5.0, 0.1))
    [o] = compare_to_baseline(report(est("rate", 5.0 - 2.0 * se + 0.01, 0.1)), base)
    assert o.passed
    # a larger z widens the allowance, z = 0 leaves only the tolerance
    [o] = compare_to_baseline(report(est("rate", 4.9, 0.1)), base, z=0.0)
    assert o.failed


def test_baseline_tolerance_is_respected():
    base = report(est("rate", 5.0, 0.0))
    new = report(est("rate", 4.0, 0.0))
    [o] = compare_to_baseline(new, base)
    assert o.failed and math.isinf(o.z_score) and o.z_score < 0
    [o] = compare_to_baseline(new, base, tolerances={"rate": 1.01})
    assert o.passed and o.tolerance == 1.01 and o.allowed == pytest.approx(1.01)
    [o] = compare_to_baseline(new, base, tolerances={"rate": 0.99})
    assert o.failed


@pytest.mark.parametrize("metric, bad_sign", [
    ("rate", -1), ("mutual_information", -1), ("active_units", -1), ("elbo", -1),
    ("marginal_kl", +1), ("iw_nll", +1), ("distortion", +1), ("total_correlation", +1),
])
def test_direction_table(metric, bad_sign):
    assert BAD_DIRECTION[metric] == ("up" if bad_sign > 0 else "down")
    base = report(est(metric, 10.0, 0.1))
    worse = report(est(metric, 10.0 + bad_sign * 1.0, 0.1))
    better = report(est(metric, 10.0 - bad_sign * 1.0, 0.1))
    assert compare_to_baseline(worse, base)[0].failed
    assert compare_to_baseline(better, base)[0].passed


def test_unlisted_metrics_are_two_sided_and_directions_can_be_overridden():
    base = report(est("ks_test", 0.5, 0.01))
    for v in (0.4, 0.6):
        [o] = compare_to_baseline(report(est("ks_test", v, 0.01)), base)
        assert o.failed and o.direction == "both"
    [o] = compare_to_baseline(report(est("ks_test", 0.4, 0.01)), base, directions={"ks_test": "up"})
    assert o.passed
    with pytest.raises(ValueError, match="'up', 'down', 'both'"):
        compare_to_baseline(base, base, directions={"ks_test": "sideways"})


def test_baseline_compares_metrics_in_both_and_extras_on_request(doc):
    base = report(est("rate", 5.0, 0.1),
                  est("iw_nll", 89.0, 0.5, extra={"bits_per_dim": 0.15, "bits_per_dim_stderr": 0.001}),
                  est("distortion", 80.0, 0.5))
    outcomes = compare_to_baseline(doc, base)
    assert [o.metric for o in outcomes] == ["rate", "iw_nll"]  # distortion: baseline only; marginal_kl: new only
    [o] = compare_to_baseline(doc, base, metrics=["iw_nll.bits_per_dim"])
    assert o.failed and o.direction == "up" and o.delta == pytest.approx(0.01)
    # a tolerance on an extra asks for that comparison too
    outcomes = compare_to_baseline(doc, base, tolerances={"iw_nll.bits_per_dim": 0.02})
    assert outcomes[-1].metric == "iw_nll.bits_per_dim" and outcomes[-1].passed
    # named metrics that a report lacks are errors
    [o] = compare_to_baseline(doc, base, metrics=["distortion"])
    assert o.error and o.error_kind == "missing" and "report" in o.message


def test_baseline_null_value_is_non_finite_error():
    base = report(est("rate", 5.0, 0.1))
    [o] = compare_to_baseline(report(est("rate", float("nan"), float("nan"))), base)
    assert o.error and o.error_kind == "non_finite" and exit_code([o]) == EXIT_RUNTIME
    [o] = compare_to_baseline(base, report(est("rate", float("inf"), 0.1)))
    assert o.error and "baseline" in o.message


def test_baseline_missing_stderr_counts_as_zero_and_says_so():
    base = report(est("active_units", 8.0, float("nan"), unit="dimensions"))
    [o] = compare_to_baseline(report(est("active_units", 7.0, float("nan"), unit="dimensions")), base)
    assert o.failed and o.allowed == 0.0 and "counted as 0" in o.message
    [o] = compare_to_baseline(report(est("active_units", 7.0, float("nan"), unit="dimensions")), base,
                              tolerances={"active_units": 1})
    assert o.passed


def test_baseline_unit_mismatch_and_settings_note():
    base = report(est("iw_nll", 90.0, 0.5, unit="nats", settings={"k": 100, "seed": 0}))
    [o] = compare_to_baseline(report(est("iw_nll", 90.0, 0.5, unit="bits")), base)
    assert o.error and o.error_kind == "mismatch" and exit_code([o]) == EXIT_USAGE
    [o] = compare_to_baseline(report(est("iw_nll", 90.2, 0.5, settings={"k": 1000, "seed": 1})), base)
    assert o.passed and "k: 1000 vs baseline 100" in o.message and "seed" not in o.message


def test_baseline_argument_checks(doc):
    with pytest.raises(ValueError, match="z must be a finite number >= 0"):
        compare_to_baseline(doc, doc, z=-1)
    with pytest.raises(TypeError, match=r"tolerances\['rate'\]"):
        compare_to_baseline(doc, doc, tolerances={"rate": "0.1"})
    with pytest.raises(ValueError, match="Did you mean 'rate'"):
        compare_to_baseline(doc, doc, tolerances={"rat": 0.1})
    with pytest.raises(TypeError, match="list of metric references"):
        compare_to_baseline(doc, doc, metrics="rate")


def test_rules_and_baseline_together_set_the_exit_code(doc):
    base = report(est("rate", 5.0, 0.1))
    outcomes = evaluate_rules(doc, ["rate<2"]) + compare_to_baseline(report(est("rate", 3.0, 0.1)), base)
    assert [o.status for o in outcomes] == ["passed", "failed"]
    assert exit_code(outcomes) == EXIT_RULE_FAILED and exit_code(outcomes, nofail=True) == EXIT_OK


# ------------------------------------------------------------------------------------------------------- pyproject
@needs_toml
def test_load_pyproject_rules(tmp_path):
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "x"\n\n'
        '[tool.latentdiag.check]\n'
        'fail-if = ["rate<2.0", "iw_nll.bits_per_dim > 1.5"]\n'
        'baseline = "baseline/report.json"\n'
        'tolerance = { rate = 0.1, iw_nll.bits_per_dim = 0.01, "iw_nll.perplexity" = 1 }\n'
        'z = 3\n')
    for where in (tmp_path, tmp_path / "pyproject.toml", str(tmp_path)):
        cfg = load_pyproject_rules(where)
        assert [r.text for r in cfg.fail_if] == ["rate<2.0", "iw_nll.bits_per_dim>1.5"]
        assert cfg.baseline == tmp_path / "baseline" / "report.json"
        assert cfg.tolerances == {"rate": 0.1, "iw_nll.bits_per_dim": 0.01, "iw_nll.perplexity": 1.0}
        assert cfg.z == 3.0 and isinstance(cfg.z, float)
        assert cfg.source == tmp_path / "pyproject.toml"


@needs_toml
def test_load_pyproject_without_table_or_file(tmp_path):
    assert load_pyproject_rules(tmp_path) == CheckConfig()
    (tmp_path / "pyproject.toml").write_text('[tool.other]\na = 1\n')
    cfg = load_pyproject_rules(tmp_path)
    assert cfg.fail_if == () and cfg.baseline is None and cfg.z is None and cfg.source is not None
    with pytest.raises(FileNotFoundError):
        load_pyproject_rules(tmp_path / "nope.toml")


@needs_toml
@pytest.mark.parametrize("body, error, match", [
    ('fail-if = "rate<2"', TypeError, "key 'fail-if'.*list of strings"),
    ('fail-if = ["rate=<2"]', ValueError, "key 'fail-if'.*'rate=<2'.*did you mean '<='"),
    ('fail_if = ["rate<2"]', ValueError, "unknown key 'fail_if'.*Did you mean 'fail-if'"),
    ('baseline = 3', TypeError, "key 'baseline'"),
    ('tolerance = 0.1', TypeError, "key 'tolerance' .*table"),
    ('tolerance = { rate = "a" }', TypeError, "key 'tolerance.rate'"),
    ('tolerance = { rate = -1 }', ValueError, "key 'tolerance.rate'"),
    ('z = true', TypeError, "key 'z'"),
    ('z = -2.0', ValueError, "key 'z'"),
    ('z = [', ValueError, "is not valid TOML"),
])
def test_load_pyproject_errors_name_the_key(tmp_path, body, error, match):
    path = tmp_path / "pyproject.toml"
    path.write_text(f"[tool.latentdiag.check]\n{body}\n")
    with pytest.raises(error, match=match) as info:
        load_pyproject_rules(path)
    assert str(path) in str(info.value)


def test_toml_module_fallback(monkeypatch):
    if sys.version_info >= (3, 11):
        import tomllib

        assert _toml_module((3, 11)) is tomllib
    monkeypatch.setitem(sys.modules, "tomli", None)  # not installed
    with pytest.raises(ImportError, match="pip install tomli"):
        _toml_module((3, 10))
    fake = type(sys)("tomli")
    monkeypatch.setitem(sys.modules, "tomli", fake)
    assert _toml_module((3, 10)) is fake


# ----------------------------------------------------------------------------------------------------- load_report
def test_load_report(tmp_path, doc):
    path = tmp_path / "report.json"
    path.write_text(json.dumps(doc))
    assert load_report(path) == doc
    path.write_text("{not json")
    with pytest.raises(ValueError, match="invalid JSON"):
        load_report(path)
    path.write_text('{"schema_version": "1.0", "results": []}')
    with pytest.raises(ValueError, match="schema_version 1.0"):
        load_report(path)
    path.write_text('{"schema_version": "0.1", "results": [3]}')
    with pytest.raises(ValueError, match=r"results\[0\]"):
        load_report(path)
    path.write_text('[1]')
    with pytest.raises(ValueError, match="not a latentdiag report"):
        load_report(path)


# ------------------------------------------------------------------------------------------------------- renderers
def test_render_junit_parses_and_counts(doc):
    doc["results"].append(est("elbo", float("nan"), float("nan")))
    outcomes = evaluate_rules(doc, ["rate>2", "marginal_kl>0.5", "elbo<0", "rat<1", "iw_nll<1", "rate>=5"])
    outcomes += compare_to_baseline(report(est("rate", 3.0, 0.1)), report(est("rate", 5.0, 0.1)))
    root = ET.fromstring(render_junit(outcomes, suite_name="my.gate"))
    assert root.tag == "testsuites"
    [suite] = root.findall("testsuite")
    assert suite.get("name") == "my.gate"
    cases = suite.findall("testcase")
    assert len(cases) == len(outcomes) == int(suite.get("tests")) == 7
    assert int(suite.get("failures")) == 3 == len(suite.findall("testcase/failure"))  # rate>2, >=5, the regression
    assert int(suite.get("errors")) == 2 == len(suite.findall("testcase/error"))      # elbo null, rat missing
    assert cases[0].get("name") == "rate>2" and cases[0].find("failure").get("type") == "RuleFailed"
    assert cases[2].find("error").get("type") == "NonFiniteMetric"
    assert cases[6].find("failure").get("type") == "Regression"
    assert cases[6].get("classname") == "my.gate.baseline"
    assert int(root.get("failures")) == 3 and int(root.get("errors")) == 2
    assert cases[1].find("failure") is None and "marginal_kl = 0.3" in cases[1].find("system-out").text


def test_render_junit_escapes_and_empty():
    doc = report(est("rate", 1.0))
    doc["results"][0]["name"] = "a<b&\x01c"
    [o] = evaluate_rules(doc, ["rate<2"])  # missing; the message lists the odd name
    assert "a<b&\x01c" in o.message
    root = ET.fromstring(render_junit([o]))
    assert "a<b&?c" in root.find("testsuite/testcase/error").get("message")
    empty = ET.fromstring(render_junit([]))
    assert empty.find("testsuite").get("tests") == "0"


def test_render_outcomes_table(doc):
    outcomes = evaluate_rules(doc, ["rate>2", "marginal_kl>0.5", "rat<1"])
    outcomes += compare_to_baseline(report(est("rate", 3.0, 0.1)), report(est("rate", 5.0, 0.1)))
    text = render_outcomes_table(outcomes)
    lines = text.splitlines()
    assert lines[0].split() == ["status", "check", "observed", "limit"]
    assert set(lines[1]) <= {"-", " "}
    rows = lines[2:6]
    assert [r.split()[0] for r in rows] == ["FAIL", "PASS", "ERROR", "FAIL"]
    col = lines[0].index("check")
    assert all(r[col - 2:col] == "  " and r[col] != " " for r in rows)  # aligned
    assert "5 ± 0.1 nats" in rows[0] and "fails if > 2" in rows[0]
    assert "baseline 5 ± 0.1; fails if drop > 0.2828" in rows[3]
    assert "- rat<1: rat is not in the report" in text  # messages of failures and errors below the table
    assert lines[-1] == "4 checks: 1 passed, 2 failed, 1 error"
    assert render_outcomes_table([]).endswith("nothing evaluated: no checks")


def test_rule_dataclass_round_trip():
    rule = parse_rule("rate<2")
    assert parse_rule(rule) is rule
    assert isinstance(rule, Rule) and rule.fails_on(1.0) and not rule.fails_on(2.0)

"""The CI gate of ``latentdiag check``: rules, baseline regressions in the harmful direction beyond the noise,
declared gates (recorded in the report or taken from the registry), the default gated set, name checks, refused
baselines, pyproject config, exit codes, JUnit XML and the terminal tables."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import xml.etree.ElementTree as ET

import pytest

from latentdiag.report.check import (
    DEFAULT_Z,
    EXIT_NOTHING_EVALUATED,
    EXIT_OK,
    EXIT_RULE_FAILED,
    EXIT_RUNTIME,
    EXIT_USAGE,
    OPERATORS,
    BaselineMismatchError,
    CheckConfig,
    Gate,
    Rule,
    _toml_module,
    compare_to_baseline,
    default_gated,
    evaluate_rules,
    exit_code,
    load_pyproject_rules,
    load_report,
    parse_rule,
    render_junit,
    render_outcomes_table,
)
from latentdiag.report.runner import declared_gates
from latentdiag.results import Estimate


# Python 3.10 reads TOML only with tomli installed; the pyproject tests need one of the two
needs_toml = pytest.mark.skipif(sys.version_info < (3, 11) and importlib.util.find_spec("tomli") is None,
                                reason="Python < 3.11 without tomli")


def est(name, value, stderr=0.05, *, unit="nats", extra=None, settings=None, n=1000, gates=None):
    out = Estimate(name=name, value=value, stderr=stderr, n=n, unit=unit, estimator="test",
                   settings=settings or {}, extra=extra or {}).to_dict()
    if gates is not None:
        out["gates"] = {k: g.to_dict() for k, g in gates.items()}
    return out


def report(*results, skipped=None, data=None, schema="0.1"):
    doc = {"schema_version": schema, "provenance": {"seed": 0}, "results": list(results)}
    if data is not None:
        doc["provenance"]["data"] = data
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


def test_unknown_metric_is_an_error_with_did_you_mean_and_the_available_list(doc):
    o, ok = evaluate_rules(doc, ["rat<2", "rate<2"])
    assert o.error and o.error_kind == "unknown"
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
    assert exit_code(evaluate_rules(doc, ["mmd>1"])) == EXIT_NOTHING_EVALUATED  # the report skipped it
    assert exit_code(evaluate_rules(doc, ["distortion>1"])) == EXIT_NOTHING_EVALUATED  # a real metric, not run
    assert exit_code(evaluate_rules(doc, [])) == EXIT_NOTHING_EVALUATED


def test_unknown_names_are_usage_errors_never_4(doc):
    # a name no metric has is a usage error, also when nothing else was evaluated
    for rules in (["rat<2"], ["rat<2", "mmd>1"], ["marginal_kll>0.5"]):
        assert exit_code(evaluate_rules(doc, rules)) == EXIT_USAGE
    # a --metrics group is not a result name: the message names the group's results
    [o] = evaluate_rules(report(est("rate", 1.0)), ["mmd<1"])
    assert o.error_kind == "unknown" and "'mmd' is a --metrics group" in o.message
    assert "mmd2_aggregate_vs_prior" in o.message and exit_code([o]) == EXIT_USAGE
    # a result of a group the report skipped says the report's reason
    [o] = evaluate_rules(report(est("rate", 1.0), skipped={"decoding": "the model lacks decoder_logits"}),
                         ["decoding_js<0.01"])
    assert o.error_kind == "skipped" and "decoder_logits" in o.message and "'decoding'" in o.message
    # a real metric the report did not run says which --metrics group runs it
    [o] = evaluate_rules(doc, ["distortion>1"])
    assert o.error_kind == "missing" and "--metrics distortion" in o.message


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
def test_baseline_rate_drop_beyond_noise_fails_and_rise_is_an_improvement():
    base = report(est("rate", 5.0, 0.1))
    se = math.hypot(0.1, 0.1)
    drop = report(est("rate", 5.0 - DEFAULT_Z * se - 0.01, 0.1))
    [o] = compare_to_baseline(drop, base)
    assert o.failed and o.kind == "baseline" and o.direction == "down" and o.verdict == "regressed"
    assert o.delta == pytest.approx(-DEFAULT_Z * se - 0.01)
    assert o.allowed == pytest.approx(DEFAULT_Z * se)
    assert o.z_score == pytest.approx(o.delta / se)
    assert "REGRESSED" in o.message and "posterior collapse" in o.message and exit_code([o]) == EXIT_RULE_FAILED
    # the same move upwards is no regression for the rate: an improvement, reported as such
    rise = report(est("rate", 5.0 + DEFAULT_Z * se + 0.5, 0.1))
    [o] = compare_to_baseline(rise, base)
    assert o.passed and o.z_score > DEFAULT_Z and o.verdict == "improved" and "improved" in o.message
    [o] = compare_to_baseline(report(est("rate", 5.1, 0.1)), base)
    assert o.passed and o.verdict == "within_noise"


def test_default_z_is_3():
    # one-sided at 3 standard errors: about 0.1% false alarms per gated number, so a re-run with another seed
    # (about ten numbers) stays green; measured on 20 seeds in benchmarks/bench_check_gate.py
    assert DEFAULT_Z == 3.0


def test_baseline_within_noise_passes():
    se = math.hypot(0.1, 0.1)
    base = report(est("rate", 5.0, 0.1))
    [o] = compare_to_baseline(report(est("rate", 5.0 - DEFAULT_Z * se + 0.01, 0.1)), base)
    assert o.passed and o.verdict == "within_noise"
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


HARMFUL_SIGN = {"rate": -1, "mutual_information": -1, "mutual_information_upper": -1, "active_units": -1,
                "elbo": -1, "marginal_kl": +1, "marginal_kl_lower": +1, "iw_nll": +1, "distortion": +1,
                "total_correlation": +1, "dimwise_kl": +1, "linear_probe": -1, "ks_test": +1,
                "mmd2_aggregate_vs_prior": +1, "intrinsic_dimension": -1}


@pytest.mark.parametrize("metric, bad_sign", sorted(HARMFUL_SIGN.items()))
def test_declared_harmful_direction_only(metric, bad_sign):
    _, gate = declared_gates()[metric]
    assert gate.harmful == ("up" if bad_sign > 0 else "down")
    base = report(est(metric, 10.0, 0.1, unit=gate.unit))
    worse = report(est(metric, 10.0 + bad_sign * 3.0, 0.1, unit=gate.unit))
    better = report(est(metric, 10.0 - bad_sign * 3.0, 0.1, unit=gate.unit))
    [o] = compare_to_baseline(worse, base, metrics=[metric])
    assert o.failed and o.verdict == "regressed"
    [o] = compare_to_baseline(better, base, metrics=[metric])
    assert o.passed and o.verdict == "improved"


def test_default_gated_set_is_the_use_case():
    # rate, both ends of the marginal-KL bracket, MI (both ends), -ELBO / IW-NLL (and bits/dim), active units
    assert set(default_gated()) == {
        "rate", "marginal_kl", "marginal_kl_lower", "mutual_information", "mutual_information_upper", "elbo",
        "elbo.negative_elbo_bits_per_dim", "iw_nll", "iw_nll.bits_per_dim", "active_units"}
    names = [n for n, _ in declared_gates().items()]
    assert len(names) == len(set(names))


def test_only_the_default_set_is_compared_unless_named():
    base = report(est("rate", 5.0, 0.1), est("distortion", 80.0, 0.5),
                  est("ks_test", 3.0, float("nan"), unit="dimensions", extra={"max_statistic": 0.1,
                                                                            "max_statistic_stderr": 0.01}),
                  est("linear_probe", 0.9, 0.01, unit="accuracy"))
    new = report(est("rate", 5.0, 0.1), est("distortion", 90.0, 0.5),
                 est("ks_test", 9.0, float("nan"), unit="dimensions", extra={"max_statistic": 0.3,
                                                                           "max_statistic_stderr": 0.01}),
                 est("linear_probe", 0.5, 0.01, unit="accuracy"))
    outcomes = compare_to_baseline(new, base)
    assert [o.metric for o in outcomes] == ["rate"] and exit_code(outcomes) == EXIT_OK
    outcomes = compare_to_baseline(new, base, compare=["distortion", "ks_test", "ks_test.max_statistic"])
    assert [(o.metric, o.status) for o in outcomes] == [
        ("rate", "passed"), ("distortion", "failed"), ("ks_test", "failed"), ("ks_test.max_statistic", "failed")]
    assert outcomes[2].tolerance == 1.0 and outcomes[2].allowed == 1.0  # a count: its declared integer tolerance
    assert outcomes[3].stderr == 0.01 and outcomes[3].unit == ""
    # metrics= replaces the default set
    assert [o.metric for o in compare_to_baseline(new, base, metrics=["linear_probe"])] == ["linear_probe"]
    # a tolerance on a number both reports hold asks for that comparison too
    [_, o] = compare_to_baseline(new, base, tolerances={"distortion": 20.0})
    assert o.metric == "distortion" and o.passed and o.tolerance == 20.0


def test_count_tolerance_declared_and_replaced():
    base = report(est("active_units", 8.0, float("nan"), unit="dimensions"))
    for value, status in ((7.0, "passed"), (6.0, "failed"), (9.0, "passed")):
        [o] = compare_to_baseline(report(est("active_units", value, float("nan"), unit="dimensions")), base)
        assert o.status == status and o.tolerance == 1.0 and o.allowed == 1.0
        assert "No standard error in the report and baseline: counted as 0." in o.message
    [o] = compare_to_baseline(report(est("active_units", 7.0, float("nan"), unit="dimensions")), base,
                              tolerances={"active_units": 0})
    assert o.failed


def test_number_without_any_uncertainty_is_a_usage_error():
    # an undeclared count with no standard error: any change would fail; the gate asks for a tolerance instead
    base = report(est("my_count", 8.0, float("nan"), unit="things"))
    new = report(est("my_count", 8.0, float("nan"), unit="things"))
    [o] = compare_to_baseline(new, base, compare=["my_count"])
    assert o.error and o.error_kind == "no_uncertainty" and "--tolerance my_count=" in o.message
    assert exit_code([o]) == EXIT_USAGE
    [o] = compare_to_baseline(new, base, compare=["my_count"], tolerances={"my_count": 0})  # equality asked for
    assert o.passed


def test_pvalues_are_never_compared_with_a_baseline():
    res = est("mmd2_aggregate_vs_prior", 0.01, 0.002, unit="squared kernel distance", extra={"pvalue": 0.3})
    doc = report(res)
    [o] = compare_to_baseline(doc, doc, compare=["mmd2_aggregate_vs_prior.pvalue"])
    assert o.error and o.error_kind == "not_comparable" and "not an effect size" in o.message
    assert exit_code([o]) == EXIT_USAGE
    # the statistic itself is compared (with its standard error), and a rule still reaches the p-value
    [o] = compare_to_baseline(doc, doc, compare=["mmd2_aggregate_vs_prior"])
    assert o.passed and o.stderr == 0.002
    [o] = evaluate_rules(doc, ["mmd2_aggregate_vs_prior.pvalue<0.01"])
    assert o.passed and o.value == 0.3


def test_undeclared_metric_is_two_sided_when_named_and_directions_override():
    base = report(est("my_score", 0.5, 0.01, unit=""))
    for v in (0.4, 0.6):
        [o] = compare_to_baseline(report(est("my_score", v, 0.01, unit="")), base, compare=["my_score"])
        assert o.failed and o.direction == "both" and "declares a harmful direction" in o.message
    assert compare_to_baseline(report(est("my_score", 0.4, 0.01, unit="")), base) == []  # not in the default set
    [o] = compare_to_baseline(report(est("my_score", 0.4, 0.01, unit="")), base, compare=["my_score"],
                              directions={"my_score": "up"})
    assert o.passed and o.verdict == "improved"
    with pytest.raises(ValueError, match="'up', 'down', 'both'"):
        compare_to_baseline(base, base, directions={"my_score": "sideways"})


def test_recorded_gates_are_used_without_the_registry():
    # a saved report carries its gates: an unregistered metric recorded as default-gated, harmful when it drops
    gate = Gate("down", "points", tolerance=0.5, default=True, why="the score falls")
    base = report(est("my_score", 10.0, 0.1, unit="points", gates={"value": gate}))
    new = report(est("my_score", 9.0, 0.1, unit="points", gates={"value": gate}))
    [o] = compare_to_baseline(new, base)
    assert o.failed and o.direction == "down" and o.tolerance == 0.5
    assert o.allowed == pytest.approx(0.5 + DEFAULT_Z * math.hypot(0.1, 0.1)) and "the score falls" in o.message
    # the report's record wins over the registry's declaration; a baseline's record serves an older report
    up = Gate("up", "nats", default=True)
    [o] = compare_to_baseline(report(est("rate", 4.0, 0.1, gates={"value": up})), report(est("rate", 5.0, 0.1)))
    assert o.passed and o.direction == "up"
    [o] = compare_to_baseline(report(est("rate", 4.0, 0.1)), report(est("rate", 5.0, 0.1, gates={"value": up})))
    assert o.direction == "up"
    # a recorded unit of an extra is the one shown and compared
    g = {"value": Gate("up", "nats"), "bpd": Gate("up", "bits/dim", default=True)}
    doc = report(est("my_nll", 90.0, 0.5, extra={"bpd": 0.2, "bpd_stderr": 0.01}, gates=g))
    [o] = compare_to_baseline(doc, doc)
    assert o.metric == "my_nll.bpd" and o.unit == "bits/dim" and o.passed


def test_malformed_recorded_gate_is_refused():
    doc = report(est("rate", 5.0))
    doc["results"][0]["gates"] = {"value": {"harmful": "sideways", "unit": "nats"}}
    with pytest.raises(ValueError, match=r"gates\['value'\].*'up', 'down', 'both', 'none'"):
        compare_to_baseline(doc, doc)


def test_default_metric_in_one_report_only_is_not_compared_and_says_so():
    base = report(est("rate", 5.0, 0.1), est("mutual_information", 3.0, 0.1))
    new = report(est("rate", 5.0, 0.1), est("mutual_information", 3.0, 0.1),
                 est("mutual_information_upper", 3.5, 0.1))  # the new bracket end, not in an older baseline
    outcomes = compare_to_baseline(new, base)
    assert [(o.metric, o.status) for o in outcomes] == [
        ("rate", "passed"), ("mutual_information", "passed"), ("mutual_information_upper", "skipped")]
    assert "make a new baseline" in outcomes[2].message and outcomes[2].verdict == "not_compared"
    assert exit_code(outcomes) == EXIT_OK
    assert exit_code(outcomes[2:]) == EXIT_NOTHING_EVALUATED


def test_named_metric_that_a_report_lacks_is_an_error(doc):
    base = report(est("rate", 5.0, 0.1), est("distortion", 80.0, 0.5))
    outcomes = compare_to_baseline(doc, base, compare=["distortion", "distortoin"])
    by = {o.metric: o for o in outcomes}
    assert by["distortion"].error_kind == "missing" and "report" in by["distortion"].message
    assert by["distortoin"].error_kind == "unknown" and "Did you mean 'distortion'?" in by["distortoin"].message
    assert exit_code(outcomes) == EXIT_USAGE


def test_baseline_null_value_is_non_finite_error():
    base = report(est("rate", 5.0, 0.1))
    [o] = compare_to_baseline(report(est("rate", float("nan"), float("nan"))), base)
    assert o.error and o.error_kind == "non_finite" and exit_code([o]) == EXIT_RUNTIME
    [o] = compare_to_baseline(base, report(est("rate", float("inf"), 0.1)))
    assert o.error and "baseline" in o.message


def test_baseline_unit_mismatch_and_settings_note():
    base = report(est("iw_nll", 90.0, 0.5, unit="nats", settings={"k": 100, "seed": 0}))
    [o] = compare_to_baseline(report(est("iw_nll", 90.0, 0.5, unit="bits")), base)
    assert o.error and o.error_kind == "mismatch" and exit_code([o]) == EXIT_USAGE
    [o] = compare_to_baseline(report(est("iw_nll", 90.2, 0.5, settings={"k": 1000, "seed": 1})), base)
    assert o.passed and "k: 1000 vs baseline 100" in o.message and "seed" not in o.message


def test_baseline_of_another_schema_version_or_other_data_is_refused():
    base = report(est("rate", 5.0, 0.1), data={"spec": "digits", "split": "test", "format": "binary", "n": 360})
    same = report(est("rate", 5.0, 0.1), data={"spec": "digits", "split": "test", "format": "binary", "n": 360})
    assert compare_to_baseline(same, base)[0].passed
    with pytest.raises(BaselineMismatchError, match="schema version 0.0.*schema version 0.1"):
        compare_to_baseline(same, report(est("rate", 5.0, 0.1), schema="0.0"))
    other = report(est("rate", 5.0, 0.1), data={"spec": "digits", "split": "train", "format": "binary", "n": 1437})
    with pytest.raises(BaselineMismatchError, match="other data.*n 360 in the baseline, 1437 in the report.*split"):
        compare_to_baseline(other, base)
    assert issubclass(BaselineMismatchError, ValueError)  # the CLI's usage error (exit 2)


def test_baseline_argument_checks(doc):
    with pytest.raises(ValueError, match="z must be a finite number >= 0"):
        compare_to_baseline(doc, doc, z=-1)
    with pytest.raises(TypeError, match=r"tolerances\['rate'\]"):
        compare_to_baseline(doc, doc, tolerances={"rate": "0.1"})
    with pytest.raises(ValueError, match="tolerances key names 'rat'.*Did you mean 'rate'"):
        compare_to_baseline(doc, doc, tolerances={"rat": 0.1})
    with pytest.raises(ValueError, match="'mmd' is a --metrics group"):
        compare_to_baseline(doc, doc, tolerances={"mmd": 0.1})
    # a tolerance for a real metric that these reports lack is fine (pyproject tolerances outlive metrics)
    assert len(compare_to_baseline(doc, doc, tolerances={"decoding_js": 0.1})) == 5
    with pytest.raises(TypeError, match="list of metric references"):
        compare_to_baseline(doc, doc, metrics="rate")
    with pytest.raises(TypeError, match="list of metric references"):
        compare_to_baseline(doc, doc, compare="rate")
    with pytest.raises(ValueError, match="compare entry 'a..b'"):
        compare_to_baseline(doc, doc, compare=["a..b"])


def test_gate_validation_and_round_trip():
    g = Gate("down", "nats", tolerance=1, default=True, why="x")
    assert g.tolerance == 1.0 and Gate.from_dict(g.to_dict()) == g
    with pytest.raises(ValueError, match="harmful must be one of"):
        Gate("sideways", "nats")
    with pytest.raises(ValueError, match="Gate tolerance must be a finite number >= 0"):
        Gate("up", "nats", tolerance=-1)
    with pytest.raises(ValueError, match="harmful='none'.*default"):
        Gate("none", "", default=True)
    with pytest.raises(TypeError, match="Gate unit must be a str"):
        Gate("up", None)
    with pytest.raises(ValueError, match="where: .*harmful"):
        Gate.from_dict({"harmful": "x"}, "where")


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
        'compare = ["distortion", "ks_test.max_statistic", "distortion"]\n'
        'tolerance = { rate = 0.1, iw_nll.bits_per_dim = 0.01, "iw_nll.perplexity" = 1 }\n'
        'z = 3\n')
    for where in (tmp_path, tmp_path / "pyproject.toml", str(tmp_path)):
        cfg = load_pyproject_rules(where)
        assert [r.text for r in cfg.fail_if] == ["rate<2.0", "iw_nll.bits_per_dim>1.5"]
        assert cfg.baseline == tmp_path / "baseline" / "report.json"
        assert cfg.tolerances == {"rate": 0.1, "iw_nll.bits_per_dim": 0.01, "iw_nll.perplexity": 1.0}
        assert cfg.z == 3.0 and isinstance(cfg.z, float)
        assert cfg.compare == ("distortion", "ks_test.max_statistic")
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
    ('compare = "rate"', TypeError, "key 'compare'.*list of strings"),
    ('compare = ["a b"]', ValueError, "key 'compare'.*'a b'"),
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
    outcomes += compare_to_baseline(report(est("rate", 5.0, 0.1), est("mutual_information", 1.0, 0.1)),
                                    report(est("rate", 5.0, 0.1)))[1:]
    root = ET.fromstring(render_junit(outcomes, suite_name="my.gate"))
    assert root.tag == "testsuites"
    [suite] = root.findall("testsuite")
    assert suite.get("name") == "my.gate"
    cases = suite.findall("testcase")
    assert len(cases) == len(outcomes) == int(suite.get("tests")) == 8
    assert int(suite.get("failures")) == 3 == len(suite.findall("testcase/failure"))  # rate>2, >=5, the regression
    assert int(suite.get("errors")) == 2 == len(suite.findall("testcase/error"))      # elbo null, rat unknown
    assert int(suite.get("skipped")) == 1 == len(suite.findall("testcase/skipped"))   # MI: in the report only
    assert cases[0].get("name") == "rate>2" and cases[0].find("failure").get("type") == "RuleFailed"
    assert cases[2].find("error").get("type") == "NonFiniteMetric"
    assert cases[3].find("error").get("type") == "UnknownMetric"
    assert cases[6].find("failure").get("type") == "Regression"
    assert cases[6].get("classname") == "my.gate.baseline"
    props = {p.get("name"): p.get("value") for p in cases[6].findall("properties/property")}
    assert props["baseline"] == "5" and props["value"] == "3" and props["difference"] == "-2"
    assert props["allowed"] == f"{DEFAULT_Z * math.hypot(0.1, 0.1):.6g}" and props["harmful_direction"] == "down"
    assert props["verdict"] == "regressed" and props["unit"] == "nats"
    assert cases[0].find("properties") is None  # rules carry no comparison
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
    outcomes += compare_to_baseline(report(est("rate", 3.0, 0.1), est("elbo", -90.0, 0.5)),
                                    report(est("rate", 5.0, 0.1), est("elbo", -100.0, 0.5)))
    text = render_outcomes_table(outcomes)
    lines = text.splitlines()
    assert lines[0].split() == ["status", "check", "observed", "limit"]
    assert set(lines[1]) <= {"-", " "}
    rows = lines[2:5]
    assert [r.split()[0] for r in rows] == ["FAIL", "PASS", "ERROR"]
    col = lines[0].index("check")
    assert all(r[col - 2:col] == "  " and r[col] != " " for r in rows)  # aligned
    assert "5 ± 0.1 nats" in rows[0] and "fails if > 2" in rows[0]
    # the comparisons: baseline, new, difference, allowed, harmful direction and verdict per metric
    head = lines[6]
    assert head.split() == ["status", "metric", "harmful", "baseline", "new", "difference", "allowed", "verdict"]
    rate, elbo = lines[8], lines[9]
    for row, cells in ((rate, ["FAIL", "rate", "drop", "5 ± 0.1", "3 ± 0.1 nats", "-2", "0.4243", "REGRESSED"]),
                       (elbo, ["PASS", "elbo", "drop", "-100 ± 0.5", "-90 ± 0.5 nats", "+10", "2.121",
                               "improved"])):
        starts = [head.index(h) for h in ("status", "metric", "harmful", "baseline", "new", "difference",
                                          "allowed", "verdict")]
        got = [row[a:b].strip() for a, b in zip(starts, [*starts[1:], None])]
        assert got == cells
    assert "- rat<1: rat is not in the report" in text  # messages of failures and errors below the tables
    assert lines[-1] == "5 checks: 2 passed, 2 failed, 1 error (1 improved)"
    assert render_outcomes_table([]).endswith("nothing evaluated: no checks")


def test_outcome_json_shows_the_comparison():
    [o] = compare_to_baseline(report(est("marginal_kl", 0.5, 0.02)), report(est("marginal_kl", 0.3, 0.02)))
    d = json.loads(json.dumps(o.to_dict(), allow_nan=False))
    assert (d["baseline_value"], d["value"], d["direction"], d["verdict"], d["status"]) == (
        0.3, 0.5, "up", "regressed", "failed")
    assert d["delta"] == pytest.approx(0.2) and d["allowed"] == pytest.approx(DEFAULT_Z * math.hypot(0.02, 0.02))


def test_rule_dataclass_round_trip():
    rule = parse_rule("rate<2")
    assert parse_rule(rule) is rule
    assert isinstance(rule, Rule) and rule.fails_on(1.0) and not rule.fails_on(2.0)

"""``run_check``: one call for a whole check, holding the precedence of what is given over
``[tool.latentdiag.check]`` (docs/ci.md: a given value replaces the file's key; tolerances are added to the file's
table and win), reading every input before the report is evaluated, and giving what ``latentdiag check`` prints."""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

from latentdiag.cli.main import cli
from latentdiag.errors import ExitCode
from latentdiag.report import check as gate
from latentdiag.report.check import (
    DEFAULT_Z,
    BaselineMismatchError,
    CheckConfig,
    CheckResult,
    CheckUsageError,
    compare_to_baseline,
    evaluate_rules,
    load_pyproject_rules,
    parse_rule,
    render_junit,
    render_outcomes_table,
    run_check,
)

DATA = {"spec": "digits", "split": "test", "format": "binary", "n": 360}
RATE_SE, DIST_SE = 0.05, 0.3


def _result(name, value, stderr, unit="nats"):
    return {"name": name, "value": value, "stderr": stderr, "n": 360, "unit": unit, "estimator": "test",
            "settings": {"seed": 0}, "extra": {}}


def _doc(rate=5.0, distortion=15.0, units=8.0, schema="0.1", data=None):
    return {"schema_version": schema, "provenance": {"seed": 0, "data": dict(data or DATA)},
            "results": [_result("rate", rate, RATE_SE), _result("elbo", -20.0, 0.3),
                        _result("distortion", distortion, DIST_SE),
                        _result("active_units", units, None, unit="dimensions")],
            "skipped": {}}


@pytest.fixture()
def write(tmp_path):
    def write(name, doc):
        path = tmp_path / name
        path.write_text(json.dumps(doc))
        return path
    return write


def _by_check(result: CheckResult):
    return {o.check: o for o in result.outcomes}


# -- precedence ----------------------------------------------------------------------------------------------------

def test_given_rules_replace_the_configurations_and_none_or_empty_fall_back_to_it():
    cfg = CheckConfig(fail_if=(parse_rule("rate<6"),))          # fails on rate 5
    doc = _doc()
    for given in (None, [], ()):
        res = run_check(doc, rules=given, config=cfg)
        assert [r.text for r in res.rules] == ["rate<6"] and res.exit_code == ExitCode.RULE_FAILED
    res = run_check(doc, rules=["rate<1"], config=cfg)          # replaces, is not added to, the file's rules
    assert list(_by_check(res)) == ["rate<1"] and res.exit_code == ExitCode.OK
    assert run_check(doc, rules=["rate<6"], config=cfg, nofail=True).exit_code == ExitCode.OK


def test_no_rules_and_no_baseline_anywhere_is_nothing_evaluated():
    res = run_check(_doc())
    assert res.outcomes == () and res.exit_code == ExitCode.NOTHING_EVALUATED and res.nothing_evaluated
    assert res.config == CheckConfig() and res.z == DEFAULT_Z


def test_given_baseline_replaces_the_configurations(write):
    near = write("near.json", _doc(rate=5.0))
    cfg = CheckConfig(baseline=near)
    res = run_check(_doc(rate=4.99), config=cfg)
    assert res.baseline == near and res.exit_code == ExitCode.OK
    assert _by_check(res)["rate vs baseline"].baseline_value == 5.0
    # a baseline whose rate is 10: the drop to 4.99 is a regression (the rate regresses when it drops)
    for given in (_doc(rate=10.0), write("far.json", _doc(rate=10.0)), str(write("far2.json", _doc(rate=10.0)))):
        res = run_check(_doc(rate=4.99), baseline=given, config=cfg)
        assert res.exit_code == ExitCode.RULE_FAILED
        assert _by_check(res)["rate vs baseline"].verdict == "regressed"
        assert res.baseline == (None if isinstance(given, dict) else type(near)(given))
    assert run_check(_doc(), baseline="", config=cfg).baseline == near   # an empty option is not given


def test_given_compare_replaces_the_configurations_and_the_default_set_stays(write):
    base = write("base.json", _doc())
    cfg = CheckConfig(baseline=base, compare=("distortion",))
    moved = _doc(distortion=30.0)                               # a rise of 15 >> 3 standard errors
    res = run_check(moved, config=cfg)
    assert res.compare == ("distortion",) and res.exit_code == ExitCode.RULE_FAILED
    assert _by_check(res)["distortion vs baseline"].verdict == "regressed"
    res = run_check(moved, compare=["elbo"], config=cfg)
    assert res.compare == ("elbo",) and "distortion vs baseline" not in _by_check(res)
    assert {"rate vs baseline", "elbo vs baseline", "active_units vs baseline"} <= set(_by_check(res))
    assert res.exit_code == ExitCode.OK


def test_given_tolerances_are_added_to_the_configurations_and_win(write):
    base = write("base.json", _doc(units=8.0))
    cfg = CheckConfig(baseline=base, tolerances={"distortion": 100.0, "active_units": 0.0})
    new = _doc(units=7.0, distortion=16.5)
    res = run_check(new, config=cfg)                             # the file's 0 replaces the declared 1
    assert dict(res.tolerances) == {"distortion": 100.0, "active_units": 0.0}
    units = _by_check(res)["active_units vs baseline"]
    assert units.tolerance == 0.0 and units.verdict == "regressed" and res.exit_code == ExitCode.RULE_FAILED
    # a tolerance names a number to compare: distortion is compared although no compare names it
    assert _by_check(res)["distortion vs baseline"].tolerance == 100.0
    res = run_check(new, tolerances={"active_units": 1.0}, config=cfg)
    assert dict(res.tolerances) == {"distortion": 100.0, "active_units": 1.0}
    assert _by_check(res)["active_units vs baseline"].verdict == "within_noise" and res.exit_code == ExitCode.OK


@pytest.mark.parametrize("given, in_file, used", [(None, None, DEFAULT_Z), (None, 0.5, 0.5), (2.0, 0.5, 2.0),
                                                  (0.0, 0.5, 0.0)])
def test_z_given_over_the_configurations_over_the_default(write, given, in_file, used):
    base = write("base.json", _doc())
    res = run_check(_doc(rate=4.9), z=given, config=CheckConfig(baseline=base, z=in_file))
    assert res.z == used
    rate = _by_check(res)["rate vs baseline"]
    assert rate.allowed == pytest.approx(used * math.hypot(RATE_SE, RATE_SE))
    # a drop of 0.1 is 1.41 standard errors of the difference: a regression only when z < 1.41
    assert rate.verdict == ("regressed" if used < 0.1 / math.hypot(RATE_SE, RATE_SE) else "within_noise")


def test_config_as_a_pyproject_path(tmp_path, write):
    base = write("base.json", _doc())
    (tmp_path / "pyproject.toml").write_text(
        f'[tool.latentdiag.check]\nfail-if = ["rate<6"]\nbaseline = "{base.name}"\nz = 1.0\n')
    res = run_check(_doc(), config=tmp_path)
    assert res.config == load_pyproject_rules(tmp_path) and res.baseline == base and res.z == 1.0
    assert [o.check for o in res.outcomes][0] == "rate<6" and res.exit_code == ExitCode.RULE_FAILED
    (tmp_path / "pyproject.toml").write_text("[tool.latentdiag.check]\nfail_if = []\n")
    with pytest.raises(CheckUsageError, match="Did you mean 'fail-if'") as info:
        run_check(_doc(), config=tmp_path)
    assert info.value.argument == "config" and str(info.value).startswith("config: ")
    assert info.value.exit_code == ExitCode.USAGE


# -- inputs are read before the report is evaluated ---------------------------------------------------------------

def _never():
    pytest.fail("the report was evaluated before the inputs were checked")


@pytest.mark.parametrize("kwargs, argument, match", [
    ({"rules": ["rate=<1"]}, "rules", "did you mean '<='"),
    ({"baseline": "no-such-baseline.json"}, "baseline", "file not found: no-such-baseline.json"),
    ({"config": CheckConfig(baseline=__import__("pathlib").Path("gone.json"))}, "baseline", "file not found"),
])
def test_a_bad_input_fails_before_the_report_is_evaluated(kwargs, argument, match):
    with pytest.raises(CheckUsageError, match=match) as info:
        run_check(_never, **kwargs)
    assert info.value.argument == argument and isinstance(info.value, ValueError)
    assert info.value.prefixed == (argument != "rules")
    assert str(info.value) == (f"{argument}: {info.value.detail}" if info.value.prefixed else info.value.detail)


def test_report_files_are_read_and_the_callable_is_called_once(write, tmp_path):
    path = write("new.json", _doc())
    assert run_check(path, rules=["rate<6"]).outcomes == run_check(_doc(), rules=["rate<6"]).outcomes
    calls = []
    res = run_check(lambda: calls.append(1) or _doc(), rules=["rate<6"])
    assert calls == [1] and res.exit_code == ExitCode.RULE_FAILED
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(CheckUsageError, match="invalid JSON") as info:
        run_check(tmp_path / "bad.json", rules=["rate<6"])
    assert info.value.argument == "report" and not info.value.prefixed


def test_what_the_report_callable_raises_propagates_unchanged():
    class ModelFailed(RuntimeError):
        pass

    def failing():
        raise ModelFailed("boom")

    with pytest.raises(ModelFailed, match="boom"):
        run_check(failing, rules=["rate<6"])


def test_baseline_refusals_and_unknown_names_are_usage_errors():
    with pytest.raises(BaselineMismatchError, match="schema version 0.0") as info:
        run_check(_doc(), baseline=_doc(schema="0.0"))
    assert isinstance(info.value, CheckUsageError) and isinstance(info.value, ValueError)
    assert info.value.exit_code == ExitCode.USAGE
    with pytest.raises(CheckUsageError, match="tolerances key names 'rat'.*Did you mean 'rate'"):
        run_check(_doc(), baseline=_doc(), tolerances={"rat": 0.1})


# -- the result is what the gate's pieces give, and what the CLI prints -------------------------------------------

def test_the_result_equals_the_pieces(write):
    base = _doc()
    new = _doc(rate=4.0, distortion=30.0)
    res = run_check(new, rules=["rate<6", "distortion>20"], baseline=base, compare=["distortion"])
    pieces = evaluate_rules(new, ["rate<6", "distortion>20"]) + compare_to_baseline(new, base, compare=["distortion"])
    assert list(res.outcomes) == pieces
    assert res.exit_code == gate.exit_code(pieces) == ExitCode.RULE_FAILED and type(res.exit_code) is ExitCode
    assert res.to_json() == json.dumps([o.to_dict() for o in pieces], indent=2, allow_nan=False)
    assert res.render_table() == render_outcomes_table(pieces)
    assert res.render_junit() == render_junit(pieces)


def test_the_cli_prints_what_run_check_gives(write, tmp_path):
    base = write("base.json", _doc())
    new = write("new.json", _doc(units=7.0, distortion=16.5))
    (tmp_path / "pyproject.toml").write_text(
        f'[tool.latentdiag.check]\nbaseline = "{base}"\ncompare = ["distortion"]\n'
        'tolerance = { distortion = 1.0, active_units = 0 }\nfail-if = ["rate<6"]\n')
    for args, kwargs in (([], {}), (["--compare", "elbo", "--tolerance", "active_units=1", "--fail-if", "rate<1"],
                                    {"compare": ["elbo"], "tolerances": {"active_units": 1.0}, "rules": ["rate<1"]})):
        res = CliRunner().invoke(cli, ["check", "--report", str(new), "--config", str(tmp_path), "--format", "json",
                                       *args])
        expected = run_check(new, config=tmp_path, **kwargs)
        assert res.exit_code == expected.exit_code, res.output
        assert res.output.strip() == expected.to_json()
    assert [run_check(new, config=tmp_path).exit_code, expected.exit_code] == [1, 0]


def test_one_exit_code_table():
    import latentdiag.cli.main as main
    import latentdiag.cli.train_cmd as train_cmd

    for module in (main, train_cmd):
        assert not [n for n in vars(module) if n.startswith("EXIT_") or n == "_Fail"], module
    assert (gate.EXIT_OK, gate.EXIT_USAGE) == (ExitCode.OK, ExitCode.USAGE)

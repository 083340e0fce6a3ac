"""The mixed-membership result is frozen for real (issue 18 item 3): no attribute can be reassigned, nothing inside
can be changed in place, it keeps no cache, and calling its methods leaves it as it was; the package that replaced
the single module keeps its modules small and its seed logic in one file."""

from __future__ import annotations

import copy
import dataclasses
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

import numpy as np
import pytest
import torch
from torch.distributions import Independent, Normal

from latentdiag.estimators.mixed_membership import MixedMembership, mixed_membership

PACKAGE = Path(__file__).resolve().parents[1] / "latentdiag" / "estimators" / "mixed_membership"
PRIOR = Independent(Normal(torch.zeros(2), torch.ones(2)), 1)


@pytest.fixture(scope="module")
def fit() -> MixedMembership:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)          # many tiny ops: threads only add overhead
    try:
        g = torch.Generator().manual_seed(5)
        groups = {"p": torch.randn(200, 2, generator=g), "q": torch.randn(200, 2, generator=g) * 0.6 + 1.0}
        return mixed_membership(groups, components=3, steps=150, family="student_t", prior=PRIOR, device="cpu",
                                seed=0)
    finally:
        torch.set_num_threads(threads)


def _walk(value, path, seen):
    """Every mapping, sequence and array inside ``value``, with its path."""
    seen.append((path, value))
    if isinstance(value, Mapping):
        for k, v in value.items():
            _walk(v, f"{path}[{k!r}]", seen)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _walk(v, f"{path}[{i}]", seen)


def _contents(res: MixedMembership) -> list[tuple[str, object]]:
    seen: list[tuple[str, object]] = []
    for f in dataclasses.fields(res):
        _walk(getattr(res, f.name), f.name, seen)
    return seen


def _state(res: MixedMembership) -> dict[str, object]:
    """The record's attributes: each one's identity and a comparable copy of its content."""
    out = {}
    for path, v in _contents(res):
        if isinstance(v, np.ndarray):
            out[path] = (id(v), v.tobytes())
        elif isinstance(v, torch.Tensor):
            out[path] = (id(v), v.numpy().tobytes())
        elif isinstance(v, Mapping):
            out[path] = (id(v), tuple(v))
        elif isinstance(v, (str, int, float, bool, type(None), tuple)):
            out[path] = (id(v), v)
        else:
            out[path] = (id(v),)
    return out


def test_assignment_and_deletion_raise_frozen_instance_error(fit):
    for name in [f.name for f in dataclasses.fields(fit)]:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(fit, name, None)
        with pytest.raises(dataclasses.FrozenInstanceError):
            delattr(fit, name)
    with pytest.raises(dataclasses.FrozenInstanceError):
        fit._cache = {}          # no new attribute (a cache) can be added either


def test_no_mapping_list_or_array_inside_is_writable(fit):
    contents = _contents(fit)
    mappings = [(p, v) for p, v in contents if isinstance(v, Mapping)]
    arrays = [(p, v) for p, v in contents if isinstance(v, np.ndarray)]
    # the walk reaches what it must: components (loc, loc_std, scale, scale_log_std, df, df_log_std), the trace,
    # the settings and their nested mappings (batches, n_fit, n_eval, standardisation, priors)
    assert {p for p, _ in arrays} >= {"elbo_trace", "components['loc']", "components['df']"}
    assert {p for p, _ in mappings} >= {"settings", "settings['n_fit']", "settings['standardisation']", "_eval"}
    assert not [p for p, v in contents if isinstance(v, (list, dict, set))]
    for path, m in mappings:
        assert isinstance(m, MappingProxyType), path
        with pytest.raises(TypeError):
            m["new"] = 1
    for path, a in arrays:
        assert not a.flags.writeable, path
        with pytest.raises(ValueError, match="read-only"):
            a.reshape(-1)[0] = 1.0
        base = a.base
        # an array owns its data, or is a view of one that is itself read-only (no writable alias outside)
        assert base is None or not getattr(base, "flags", a.flags).writeable, path


def test_weights_is_a_fresh_frame_every_time(fit):
    w = fit.weights
    assert w is not fit.weights
    before = w.to_numpy().copy()
    w.iloc[0, 0] = 99.0
    w[("extra", 0)] = 1.0
    np.testing.assert_array_equal(fit.weights.to_numpy(), before)
    assert ("extra", 0) not in fit.weights.columns
    np.testing.assert_allclose(fit.weights["mean"].sum(axis=1), 1.0, atol=1e-9)


def test_marginal_kl_twice_gives_equal_numbers_and_leaves_the_record_unchanged(fit):
    fields_before = set(vars(fit))
    state = _state(fit)
    first = fit.marginal_kl()
    first["q"].per_datapoint[:] = 0.0          # the returned estimate is the caller's to change
    second = fit.marginal_kl()
    assert list(first) == list(second) == list(fit.groups)
    fresh = fit.marginal_kl()
    for g in fit.groups:
        a, b = second[g], fresh[g]
        assert (a.value, a.stderr, a.n) == (b.value, b.stderr, b.n)
        assert dict(a.extra) == dict(b.extra) and a.flags == b.flags and a.notes == b.notes
        np.testing.assert_array_equal(a.per_datapoint, b.per_datapoint)
    assert np.any(second["q"].per_datapoint != 0.0)
    # other seeds and references, the frame and the plots' call: still nothing stored
    fit.marginal_kl(seed=3)
    fit.marginal_kl("p", posterior_draws=2)
    fit.to_frame()
    assert set(vars(fit)) == fields_before == {f.name for f in dataclasses.fields(fit)}
    assert _state(fit) == state
    assert fit.to_frame().loc["q", "kl"] == fresh["q"].value


def test_a_replaced_record_is_frozen_too(fit):
    # what compare_aggregate_posteriors does to add its settings
    new = dataclasses.replace(fit, settings={**fit.settings, "models": ["a", "b"], "extra": {"k": 1}})
    assert isinstance(new.settings, MappingProxyType) and isinstance(new.settings["extra"], MappingProxyType)
    assert new.settings["models"] == ("a", "b")
    assert "models" not in fit.settings
    assert new.marginal_kl()["q"].value == fit.marginal_kl()["q"].value


@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
def test_pickle_and_deepcopy_round_trip_frozen(fit, how):
    other = pickle.loads(pickle.dumps(fit)) if how == "pickle" else copy.deepcopy(fit)
    assert other is not fit and isinstance(other.settings, MappingProxyType)
    assert not other.elbo_trace.flags.writeable and not other.components["loc"].flags.writeable
    np.testing.assert_array_equal(other.elbo_trace, fit.elbo_trace)
    a, b = other.marginal_kl(), fit.marginal_kl()
    assert [(e.value, e.stderr) for e in a.values()] == [(e.value, e.stderr) for e in b.values()]


def test_every_module_of_the_package_is_small():
    sizes = {p.name: len(p.read_text().splitlines()) for p in PACKAGE.glob("*.py")}
    assert {"__init__.py", "result.py", "fitting.py", "svi.py", "posterior.py", "inputs.py", "_random.py"} <= set(sizes)
    assert max(sizes.values()) <= 600, sizes


def test_seeds_are_derived_in_one_file():
    # one place to swap for a project-wide seed helper: no generator is seeded anywhere else in the package
    pattern = re.compile(r"manual_seed|mix_seed|default_rng|torch\.Generator\(|fork_rng|\.seed\(\)")
    found = {p.name: pattern.findall(p.read_text()) for p in PACKAGE.glob("*.py")}
    found.pop("_random.py")
    assert "from latentdiag._random import" in (PACKAGE / "_random.py").read_text()  # the project's one scheme
    assert {name: hits for name, hits in found.items() if hits} == {}

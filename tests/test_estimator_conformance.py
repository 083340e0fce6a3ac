"""Conformance of every public estimator (issue 18): a wrong first argument, bad data, the same seed twice, seed=None
twice and a misspelt keyword, each answered the same way by all of them.

The table ``CASES`` lists every public estimator function of :mod:`latentdiag.estimators`; a test fails when one
is added without a row, so a new estimator cannot skip these checks.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pytest
import torch

import latentdiag.estimators as est
from latentdiag.models import build_model

N, D_IN, D_Z = 48, 8, 3


@pytest.fixture(scope="module")
def world():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_model({"name": "mlp_vae", "kwargs": {"input_shape": [D_IN], "latent_dim": D_Z,
                                                          "likelihood": "bernoulli", "hidden": [16]}})
    gen = torch.Generator().manual_seed(1)
    x = (torch.rand(N, D_IN, generator=gen) < 0.5).float()
    y = (x[:, 0] * 2 + x[:, 1]).long()  # 4 classes the code can carry
    table = est.encode(model, (x, y))
    reps = table.means.numpy()
    labels = y.numpy()
    # one direction's variance sits at the PCA rule's threshold (lambda / lambda_max = 0.01), so the bootstrap of the
    # dimension count varies between draws (about 1 resample in 4 counts 3, not 4)
    spread = np.random.default_rng(2).normal(size=(N, 6)) * np.array([1.0, 0.8, 0.6, 0.1, 0.05, 0.03])
    return {"model": model, "x": x, "y": y, "data": (x, y), "table": table, "reps": reps, "labels": labels,
            "spread": spread}


@dataclasses.dataclass(frozen=True)
class Case:
    """How to call one estimator: ``call(world, first, **kw)`` with ``first`` its first argument."""

    first: str                       # key of world for a valid first argument
    call: Callable[..., Any]
    draws: bool = True               # False: no randomness at all on these inputs (seed=None gives the same)
    bad: Callable[[dict], tuple[Callable[[], Any], type]] | None = None


def _half(w):
    h = N // 2
    return w["reps"][:h], w["labels"][:h], w["reps"][h:], w["labels"][h:]


def _nan_x(w):
    x = w["x"].clone()
    x[3, 2] = float("nan")
    return x


CASES: dict[str, Case] = {
    "rate": Case("model", lambda w, m, **k: est.rate(m, w["x"], **k), draws=False),  # analytic KL: no draws
    "distortion": Case("model", lambda w, m, **k: est.distortion(m, w["x"], **k)),
    "elbo": Case("model", lambda w, m, **k: est.elbo(m, w["x"], **k)),
    "iw_nll": Case("model", lambda w, m, **k: est.iw_nll(m, w["x"], k=8, **k)),
    "encode": Case("model", lambda w, m, **k: est.encode(m, w["data"], **k), draws=False),
    "aggregate_posterior": Case("table", lambda w, t, **k: est.aggregate_posterior(t, **k)),
    "minibatch_mutual_information": Case("table", lambda w, t, **k: est.minibatch_mutual_information(
        t, minibatch_size=8, **k)),
    "active_units": Case("table", lambda w, t, **k: est.active_units(t, **k), draws=False),
    "per_dimension_kl": Case("table", lambda w, t, **k: est.per_dimension_kl(t, **k), draws=False),
    "conditional_entropy": Case("table", lambda w, t, **k: est.conditional_entropy(t, **k), draws=False),
    "extract_representations": Case("table", lambda w, t, **k: est.extract_representations(
        t, kind="sample", **k)),
    "ks_test": Case("table", lambda w, t, **k: est.ks_test(t, bootstrap=5, **k)),
    "mmd_aggregate_vs_prior": Case("table", lambda w, t, **k: est.mmd_aggregate_vs_prior(t, permutations=20, **k)),
    "mmd_test": Case("reps", lambda w, r, **k: est.mmd_test(r[:24], r[24:], permutations=20, **k)),
    "intrinsic_dimension": Case("spread", lambda w, r, **k: est.intrinsic_dimension(r, bootstrap=20, **k)),
    "linear_probe": Case("reps", lambda w, r, **k: est.linear_probe(r[:24], w["labels"][:24], r[24:],
                                                                   w["labels"][24:], seeds=1, **k)),
    "nonlinear_probe": Case("reps", lambda w, r, **k: est.nonlinear_probe(
        r[:24], w["labels"][:24], r[24:], w["labels"][24:], seeds=1, max_epochs=3, device="cpu", **k)),
    "sample_efficiency": Case("reps", lambda w, r, **k: est.sample_efficiency(
        r[:24], w["labels"][:24], r[24:], w["labels"][24:], sizes=(8, None), seeds=1, **k)),
    "decoding_divergence": Case("model", lambda w, m, **k: est.decoding_divergence(m, w["x"], repeats=2, **k)),
    "mixed_membership": Case("groups", lambda w, g, **k: est.mixed_membership(g, components=2, steps=30, **k)),
}
# Not seeded, so only the wrong-argument and keyword checks apply: js_divergence is a pure function of two
# log-probability tensors; decoded_examples needs a text model (generate and a vocab).
UNSEEDED = {
    "js_divergence": lambda w, a, **k: est.js_divergence(a, a, **k),
    "decoded_examples": lambda w, m, **k: est.decoded_examples(m, w["x"], **k),
}


def _first(w: dict, key: str) -> Any:
    if key == "groups":
        return {"prior": torch.randn(40, D_Z, generator=torch.Generator().manual_seed(5)),
                "model": w["table"].means.float()}
    return w[key]


def _public_estimator_functions() -> set[str]:
    return {name for name in est.__all__ if inspect.isfunction(getattr(est, name, None))
            and getattr(est, name).__module__.startswith("latentdiag.estimators")}


def test_every_public_estimator_has_a_row():
    assert _public_estimator_functions() == set(CASES) | set(UNSEEDED)


def _numbers(obj: Any, depth: int = 0) -> Any:
    """Every number an estimator returned, as nested plain values (wall times left out)."""
    if depth > 6:
        return None
    if isinstance(obj, torch.Tensor):
        obj = obj.detach().cpu().double().numpy()
    if isinstance(obj, np.ndarray):
        return _numbers(obj.astype(float).round(12).tolist() if obj.dtype.kind in "biuf" else obj.tolist(), depth)
    if isinstance(obj, float):
        return None if math.isnan(obj) else round(obj, 12)
    if isinstance(obj, (int, str, bool)) or obj is None:
        return obj
    if isinstance(obj, Mapping):
        return {str(k): _numbers(v, depth + 1) for k, v in obj.items() if "second" not in str(k)}
    if isinstance(obj, (list, tuple)):
        return [_numbers(v, depth) for v in obj]
    if dataclasses.is_dataclass(obj):
        return {f.name: _numbers(getattr(obj, f.name), depth + 1) for f in dataclasses.fields(obj)
                if f.name not in ("batches", "prior") and not f.name.startswith("_")}
    if hasattr(obj, "to_dict"):
        return _numbers(obj.to_dict(), depth + 1)
    return type(obj).__name__


def _run(name: str, w: dict, **kw: Any) -> Any:
    case = CASES[name]
    return case.call(w, _first(w, case.first), **kw)


@pytest.mark.parametrize("name", sorted(CASES))
def test_same_seed_twice_gives_the_same_numbers(world, name):
    a, b = _run(name, world, seed=7), _run(name, world, seed=7)
    assert _numbers(a) == _numbers(b)


@pytest.mark.parametrize("name", sorted(n for n, c in CASES.items() if c.draws))
def test_seed_none_twice_gives_different_numbers(world, name):
    a, b = _numbers(_run(name, world, seed=None)), _numbers(_run(name, world, seed=None))
    assert a != b, f"{name}(seed=None) repeated itself"


@pytest.mark.parametrize("name", sorted(n for n, c in CASES.items() if c.draws))
def test_seed_none_ignores_the_global_generators(world, name):
    # fresh randomness, not the caller's global state: re-seeding torch and numpy before each call changes nothing
    torch.manual_seed(0), np.random.seed(0)
    a = _numbers(_run(name, world, seed=None))
    torch.manual_seed(0), np.random.seed(0)
    b = _numbers(_run(name, world, seed=None))
    assert a != b


@pytest.mark.parametrize("name", sorted(n for n, c in CASES.items() if c.draws))
def test_another_seed_gives_other_numbers(world, name):
    assert _numbers(_run(name, world, seed=1)) != _numbers(_run(name, world, seed=2))


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_seed_leaves_the_callers_random_state_alone(world, name):
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()[1].copy()
    _run(name, world, seed=3)
    assert torch.equal(torch_state, torch.get_rng_state())
    assert np.array_equal(np_state, np.random.get_state()[1])


@pytest.mark.parametrize("name", sorted(CASES) + sorted(UNSEEDED))
def test_a_wrong_first_argument_is_refused_with_a_type_error(world, name):
    call = CASES[name].call if name in CASES else UNSEEDED[name]
    with pytest.raises(TypeError) as info:
        call(world, "not a model")
    assert len(str(info.value)) > 20  # says what was expected, not only that something failed


@pytest.mark.parametrize("name", sorted(CASES) + sorted(UNSEEDED))
def test_a_misspelt_keyword_names_the_estimator(world, name):
    if name in CASES:
        call, first = CASES[name].call, _first(world, CASES[name].first)
    else:
        call, first = UNSEEDED[name], (torch.zeros(2, 3) if name == "js_divergence" else world["model"])
    with pytest.raises(TypeError, match=rf"{name}\b.*'seeed'|'seeed'.*{name}\b"):
        call(world, first, seeed=0)


@pytest.mark.parametrize("name", sorted(n for n, c in CASES.items() if c.first != "groups"))
def test_bad_data_is_a_value_error_naming_the_problem(world, name):
    # NaN pixels for the model-and-data estimators (the table estimators take a model and data too), NaN features
    # for those over arrays: an InvalidDataError / ValueError that says so, never a number
    from latentdiag.errors import InvalidDataError

    case = CASES[name]
    nan_x = _nan_x(world)
    with pytest.raises(ValueError) as info:
        if case.first == "model":
            case.call({**world, "x": nan_x, "data": (nan_x, world["y"])}, world["model"])
        elif case.first == "table":
            case.call(world, world["model"], data=nan_x)
        else:
            bad = world[case.first].copy()
            bad[2, 1] = np.nan
            case.call({**world, case.first: bad}, bad)
    if case.first in ("model", "table"):
        assert isinstance(info.value, InvalidDataError) and "nan" in str(info.value).lower()
    else:
        assert "finite" in str(info.value) or "nan" in str(info.value).lower()


def test_bad_groups_for_the_mixed_membership_model(world):
    g = {"prior": torch.full((40, D_Z), float("nan")), "model": world["table"].means.float()}
    with pytest.raises(ValueError, match="finite|nan|NaN"):
        est.mixed_membership(g, components=2, steps=30)

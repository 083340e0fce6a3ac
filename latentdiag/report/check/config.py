"""The ``[tool.latentdiag.check]`` table of pyproject.toml: :class:`CheckConfig` and :func:`load_pyproject_rules`."""

from __future__ import annotations

import difflib
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from latentdiag.report.check._common import _REF_RE, _check_nonnegative
from latentdiag.report.check.rules import Rule, parse_rule

__all__ = ["CheckConfig", "load_pyproject_rules"]


@dataclass(frozen=True)
class CheckConfig:
    """Settings read from ``[tool.latentdiag.check]``; fields left unset in the file are None / empty.

    Attributes
    ----------
    fail_if : tuple of Rule
        Parsed ``fail-if`` rules.
    baseline : pathlib.Path or None
        ``baseline``, resolved against the directory of the pyproject.toml.
    tolerances : Mapping[str, float]
        ``tolerance`` table: absolute tolerance per metric reference.
    compare : tuple of str
        ``compare``: references compared against the baseline on top of the default gated set.
    z : float or None
        ``z``: standard errors of allowance (the caller falls back to :data:`DEFAULT_Z`).
    source : pathlib.Path or None
        The file read, or None when there was none.
    """

    fail_if: tuple[Rule, ...] = ()
    baseline: Path | None = None
    tolerances: Mapping[str, float] = field(default_factory=dict)
    compare: tuple[str, ...] = ()
    z: float | None = None
    source: Path | None = None


_CONFIG_KEYS = ("fail-if", "baseline", "tolerance", "compare", "z")


def _toml_module(version_info: tuple[int, ...] = tuple(sys.version_info)) -> Any:
    """``tomllib`` on Python 3.11+, else ``tomli`` if installed, else an ImportError saying what to install."""
    if tuple(version_info[:2]) >= (3, 11):
        import tomllib
        return tomllib
    try:
        import tomli
    except ImportError:
        raise ImportError("reading [tool.latentdiag.check] from pyproject.toml on Python < 3.11 needs the 'tomli' "
                          "package: pip install tomli (or pass the rules on the command line).") from None
    return tomli


def load_pyproject_rules(path_or_dir: str | Path) -> CheckConfig:
    """Read the ``[tool.latentdiag.check]`` table of a pyproject.toml.

    Recognised keys::

        [tool.latentdiag.check]
        fail-if = ["rate<2.0", "marginal_kl>0.5"]   # rules, see parse_rule
        baseline = "baseline/report.json"           # relative to the pyproject.toml's directory (made absolute)
        compare = ["distortion", "ks_test.max_statistic"]   # compared on top of the default gated set
        tolerance = { rate = 0.1, "iw_nll.bits_per_dim" = 0.01 }   # absolute, in the metric's unit
        z = 2.0                                     # standard errors of allowance

    Parameters
    ----------
    path_or_dir : str or Path
        A pyproject.toml, or a directory whose pyproject.toml is read. A directory without one, or a file without
        the table, gives an empty :class:`CheckConfig` (no upward search).

    Raises
    ------
    FileNotFoundError
        If a file path is given that does not exist.
    ValueError, TypeError
        If the TOML is malformed or a key has the wrong type or value; the message names the key and the file.
        (Whether the names are real metrics is checked against the reports, by the gate.)
    ImportError
        On Python < 3.11 without ``tomli``.
    """
    path = Path(path_or_dir).absolute()
    if path.is_dir():
        path = path / "pyproject.toml"
        if not path.is_file():
            return CheckConfig()
    elif not path.is_file():
        raise FileNotFoundError(f"pyproject file not found: {path}")
    toml = _toml_module()
    try:
        data = toml.loads(path.read_text(encoding="utf-8"))
    except toml.TOMLDecodeError as err:
        raise ValueError(f"{path} is not valid TOML: {err}") from None
    table: Any = data
    for part in ("tool", "latentdiag", "check"):
        table = table.get(part) if isinstance(table, Mapping) else None
        if table is None:
            return CheckConfig(source=path)
    where = f"[tool.latentdiag.check] in {path}"
    if not isinstance(table, Mapping):
        raise TypeError(f"{where} must be a table; got {type(table).__name__}.")
    for key in table:
        if key not in _CONFIG_KEYS:
            close = difflib.get_close_matches(key, _CONFIG_KEYS, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown key {key!r} in {where}; known keys: {', '.join(_CONFIG_KEYS)}.{hint}")

    rules: list[Rule] = []
    for r in _string_list(table, "fail-if", where, '["rate<2.0"]'):
        try:
            rules.append(parse_rule(r))
        except ValueError as err:
            raise ValueError(f"key 'fail-if' in {where}: {err}") from None

    baseline = None
    if "baseline" in table:
        raw = table["baseline"]
        if not isinstance(raw, str) or not raw.strip():
            raise TypeError(f"key 'baseline' in {where} must be a non-empty path string; got {raw!r}.")
        baseline = Path(raw)
        if not baseline.is_absolute():
            baseline = path.parent / baseline

    compare = list(dict.fromkeys(_string_list(table, "compare", where, '["distortion", "ks_test.max_statistic"]')))
    for r in compare:
        if _REF_RE.match(r) is None:
            raise ValueError(f"key 'compare' in {where}: {r!r} must name a metric or name.key.")

    tolerances: dict[str, float] = {}
    if "tolerance" in table:
        raw = table["tolerance"]
        if not isinstance(raw, Mapping):
            raise TypeError(f"key 'tolerance' in {where} must be a table such as {{ rate = 0.1 }}; "
                            f"got {type(raw).__name__} {raw!r}.")
        for metric, tol in _flatten(raw):
            if _REF_RE.match(metric) is None:
                raise ValueError(f"key 'tolerance.{metric}' in {where} must name a metric or name.key.")
            tolerances[metric] = _check_nonnegative(f"key 'tolerance.{metric}' in {where}", tol)

    z = None
    if "z" in table:
        z = _check_nonnegative(f"key 'z' in {where}", table["z"])
    return CheckConfig(fail_if=tuple(rules), baseline=baseline, tolerances=tolerances, compare=tuple(compare), z=z,
                       source=path)


def _string_list(table: Mapping[str, Any], key: str, where: str, example: str) -> list[str]:
    raw = table.get(key, [])
    if not isinstance(raw, list) or not all(isinstance(r, str) for r in raw):
        raise TypeError(f"key {key!r} in {where} must be a list of strings such as {example}; "
                        f"got {type(raw).__name__} {raw!r}.")
    return raw


def _flatten(table: Mapping[str, Any], prefix: str = "") -> Iterable[tuple[str, Any]]:
    # tolerance = { iw_nll.bits_per_dim = 0.01 } (a dotted TOML key) parses as a nested table: flatten it back.
    for k, v in table.items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping):
            yield from _flatten(v, f"{name}.")
        else:
            yield name, v

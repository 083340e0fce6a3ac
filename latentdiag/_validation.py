"""Argument checks shared by the public functions; errors name the argument, what was expected and what came."""

from __future__ import annotations

import difflib
import numbers
from collections.abc import Iterable
from typing import Any


def check_int(name: str, value: Any, *, minimum: int = 1) -> int:
    """Return ``value`` as int if it is an integer >= ``minimum`` (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer >= {minimum}; got {value!r} of type {type(value).__name__}.")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value}.")
    return int(value)


def check_positive_float(name: str, value: Any) -> float:
    """Return ``value`` as float if it is a finite number > 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a positive number; got {value!r} of type {type(value).__name__}.")
    value = float(value)
    if not (value > 0 and value < float("inf")):
        raise ValueError(f"{name} must be a positive finite number; got {value}.")
    return value


def check_fraction(name: str, value: Any, *, include_one: bool = False, context: str = "") -> float:
    """Return ``value`` as float if it lies in (0, 1) (or (0, 1] with ``include_one``); ``context`` is added to
    the message (e.g. " for rule='relative'")."""
    interval = "(0, 1]" if include_one else "(0, 1)"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number in {interval}{context}; got {value!r} of type "
                        f"{type(value).__name__}.")
    value = float(value)
    if not (value > 0 and (value <= 1 if include_one else value < 1)):
        raise ValueError(f"{name} must lie in {interval}{context}; got {value}.")
    return value


def check_choice(name: str, value: Any, choices: Iterable[str]) -> str:
    """Return ``value`` if it is one of ``choices``; otherwise say which are valid and suggest the closest."""
    choices = tuple(choices)
    listed = ", ".join(repr(c) for c in choices)
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, one of {listed}; got {type(value).__name__} {value!r}.")
    if value in choices:
        return value
    close = difflib.get_close_matches(value, choices, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"{name} must be one of {listed}; got {value!r}.{hint}")


SEED_MAX = 2 ** 32 - 1
"""The largest seed accepted: every generator a seed reaches (torch, numpy, scikit-learn's ``random_state``) takes
it without wrapping, so distinct seeds give distinct streams."""


def check_seed(name: str, value: Any, *, allow_none: bool = False, span: int = 1) -> int | None:
    """Return ``value`` as an int seed in 0..2**32-1 (numpy integers accepted; bools, floats and strings refused).

    ``span`` > 1 is for functions that use the seeds ``value, value + 1, ..., value + span - 1``: the last must be
    in range too. Out-of-range seeds are refused, never wrapped (a wrapped seed gives the numbers of another seed
    while the provenance records this one).
    """
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer >= 0 and <= {SEED_MAX} (2**32 - 1)"
                        f"{' or None' if allow_none else ''}; got {value!r} of type {type(value).__name__}.")
    value = int(value)
    last = value + max(int(span), 1) - 1
    if value < 0 or last > SEED_MAX:
        extra = f" (it uses the seeds {value}..{last})" if span > 1 and value >= 0 else ""
        raise ValueError(f"{name} must be an integer >= 0 and <= {SEED_MAX} (2**32 - 1); got {value}{extra} "
                         "(seeds are never wrapped).")
    return value


def clip_message(text: str, limit: int = 600) -> str:
    """``text`` cut to at most ``limit`` characters (a middle ellipsis says how much was left out)."""
    text = str(text)
    if len(text) <= limit:
        return text
    head = limit * 2 // 3
    tail = limit - head - 40
    end = text[-tail:] if tail > 0 else ""
    return f"{text[:head]} ... [{len(text) - head - max(tail, 0)} characters left out] ... {end}"

"""Field checks for the config dataclasses: each raises ValueError naming ``section.key``
and quoting the bad value (``"job.steps must be >= 1, got 0"``)."""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence


def fail(section: str, name: str, message: str, value: Any) -> None:
    raise ValueError(f"{section}.{name} {message}, got {value!r}")


def check_int(section: str, name: str, value: Any, minimum: Optional[int] = None,
               allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        fail(section, name, "must be an integer", value)
    if minimum is not None and value < minimum:
        fail(section, name, f"must be >= {minimum}", value)


def check_float(section: str, name: str, value: Any, *, low: Optional[float] = None,
                 high: Optional[float] = None, low_open: bool = False, high_open: bool = False,
                 allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        fail(section, name, "must be a finite number", value)
    if low is not None and (value <= low if low_open else value < low):
        fail(section, name, f"must be {'>' if low_open else '>='} {low}", value)
    if high is not None and (value >= high if high_open else value > high):
        fail(section, name, f"must be {'<' if high_open else '<='} {high}", value)


def check_bool(section: str, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        fail(section, name, "must be true or false", value)


def check_choice(section: str, name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        fail(section, name, f"must be one of {list(choices)}", value)


def check_factory(section: str, value: Any) -> None:
    if value is not None and (not isinstance(value, str) or ":" not in value):
        fail(section, "factory", "must look like 'package.module:function'", value)


def check_table(section: str, name: str, value: Any) -> None:
    if not isinstance(value, Mapping):
        fail(section, name, "must be a table of settings", value)

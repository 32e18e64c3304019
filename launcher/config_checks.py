"""Field checks for the config dataclasses: each raises ValueError naming ``section.key``
and quoting the bad value (``"job.steps must be >= 1, got 0"``)."""

from __future__ import annotations

import difflib
import math
import os
import re
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib  # type: ignore[no-redef]

_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # fullmatch: "$" would allow a trailing newline


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
    """A table of settings a checkpoint records and a resume reads back with
    ``weights_only=True``: strings, numbers, booleans, null, lists and tables only (a TOML
    or YAML date would make the run's record unreadable, and its resume checks with it)."""
    if not isinstance(value, Mapping):
        fail(section, name, "must be a table of settings", value)
    _check_plain(section, name, value)


def _check_plain(section: str, name: str, value: Any) -> None:
    if isinstance(value, Mapping):
        for key, val in value.items():
            if not isinstance(key, str):
                fail(section, name, "keys must be strings", key)
            _check_plain(section, f"{name}.{key}", val)
    elif isinstance(value, list):
        for i, val in enumerate(value):
            _check_plain(section, f"{name}[{i}]", val)
    elif value is not None and not isinstance(value, (str, bool, int, float)):
        fail(section, name, f"must be a string, number, boolean, list or table, not "
                            f"{type(value).__name__} (quote a date or time)", value)


def check_env(section: str, name: str, value: Any) -> None:
    """A table of environment variables: names a shell accepts, string values (a number in
    TOML must be quoted: the worker's environment holds strings only)."""
    check_table(section, name, value)
    for key, val in value.items():
        if not isinstance(key, str) or not _ENV_NAME_RE.fullmatch(key):
            fail(section, name, "names must be letters, digits and '_', not starting with a digit",
                 key)
        if not isinstance(val, str):
            fail(section, f"{name}.{key}", f'must be a string (quote it: "{val}")', val)


def _unique_keys_loader():
    """PyYAML's SafeLoader, refusing a key written twice in one mapping (safe_load keeps
    the last one silently: a second ``job:`` section would replace the first; TOML refuses).
    Keys merged in with ``<<`` may still be overridden, as YAML's merge keys allow."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            if isinstance(node, yaml.MappingNode):
                seen: dict = {}
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":
                        continue
                    key = self.construct_object(key_node, deep=True)
                    try:
                        first = seen.setdefault(key, key_node)
                    except TypeError:  # an unhashable key: the base class refuses it
                        continue
                    if first is not key_node:
                        raise yaml.constructor.ConstructorError(
                            None, None, f"key {key!r} on line {key_node.start_mark.line + 1} was already "
                            f"set on line {first.start_mark.line + 1} (a key or section written twice: "
                            "keep one)", key_node.start_mark)
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


def read_config_file(path: Union[str, os.PathLike]) -> dict[str, Any]:
    """A TOML or YAML job config as a dict of sections (an empty YAML file is {})."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file not found: {p}")
    suffix = p.suffix.lower()
    if suffix == ".toml":
        with open(p, "rb") as f:
            try:
                data = tomllib.load(f)
            except tomllib.TOMLDecodeError as e:
                raise ValueError(f"{p}: invalid TOML: {e}") from None
    elif suffix in (".yaml", ".yml"):
        import yaml

        with open(p) as f:
            try:
                data = yaml.load(f, Loader=_unique_keys_loader())
            except yaml.YAMLError as e:
                raise ValueError(f"{p}: invalid YAML: {' '.join(str(e).split())}") from None
        data = {} if data is None else data
    else:
        raise ValueError(f"{p}: config files must end in .toml, .yaml or .yml")
    if not isinstance(data, dict):
        raise ValueError(f"{p}: the top level must be a table of sections, got {type(data).__name__}")
    return data


def did_you_mean(unknown: Sequence[str], known: set[str]) -> str:
    """" (did you mean 'lr'?)" for a near-miss of a known key, else ""."""
    close = [m for u in unknown for m in difflib.get_close_matches(u, sorted(known), n=1)]
    return f" (did you mean {', '.join(map(repr, close))}?)" if close else ""


def parse_override(item: str) -> tuple[str, Any]:
    """``"optim.lr=3e-4"`` -> ``("optim.lr", 0.0003)``. The value is read as a TOML value
    (numbers, true/false, [lists], "quoted strings"); anything else is a bare string."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(f"override {item!r} must look like section.key=value")
    raw = raw.strip()
    if raw.lower() in ("none", "null"):
        return key, None
    try:
        return key, tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return key, raw

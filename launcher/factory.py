"""Load a user's ``"package.module:function"`` factory (``model.factory``, ``data.factory``)."""

from __future__ import annotations

import importlib
import re
from typing import Callable

_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def load_factory(spec: str, key: str) -> Callable:
    """The callable named by ``spec`` (``"my_pkg.models:build"``; the part after the colon
    may be dotted, ``"mod:Class.method"``).

    The module is imported as any other: from ``sys.path`` (the current directory for the
    CLI, ``PYTHONPATH``, an installed package, or Ray's ``runtime_env`` on a cluster).
    Raises ValueError naming ``key`` when the spec is malformed, the module cannot be
    imported, or the name is missing or not callable.
    """
    if not isinstance(spec, str) or not _SPEC.match(spec):
        raise ValueError(f"{key} must look like 'package.module:function', got {spec!r}")
    module_name, attr = spec.split(":")
    try:
        obj = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or the module's own error at import time
        raise ValueError(f"{key} = {spec!r}: cannot import module {module_name!r} "
                         f"({type(exc).__name__}: {exc}); is it on PYTHONPATH (or in "
                         "job.py_modules / job.working_dir on a cluster)?") from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{key} = {spec!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{key} = {spec!r}: {attr!r} is a {type(obj).__name__}, not a function")
    return obj

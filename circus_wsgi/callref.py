"""Naming a Python function so that another process can find it again.

A setting that holds a function (a server hook) must reach the workers, which
circus starts as new processes from a command line. So such a function is
written as a reference: ``MODULE:NAME`` for a function at the top level of an
importable module, ``/path/FILE.py:NAME`` for one at the top level of a Python
file that is not a module (a settings file, a script). :func:`reference_of`
makes the reference; :func:`resolve` finds the function from it, importing the
module or running the file (each file once per process). Functions that no
reference names (lambdas, nested functions, methods) are refused.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import runpy
import sys
from typing import Any, Callable

__all__ = ["UnresolvedReference", "REFERENCE", "reference_of", "resolve", "arguments_taken"]

#: ``MODULE:NAME`` or ``FILE.py:NAME`` (the file's path may hold anything but a line break).
REFERENCE = re.compile(r"^(?:[A-Za-z_][\w.]*|[^\n]+\.py):[A-Za-z_]\w*$")

_MODULE = re.compile(r"^[A-Za-z_][\w.]*$")  # not runpy's "<run_path>" while a file runs
_FILES: dict[str, dict[str, Any]] = {}  # the namespaces of the files run by resolve()


class UnresolvedReference(LookupError):
    """A reference that names no function; the message is one line."""


def reference_of(function: Callable[..., Any]) -> str:
    """The reference that names ``function``; ValueError if none can."""
    name = getattr(function, "__qualname__", "")
    namespace = getattr(function, "__globals__", None)
    if not inspect.isfunction(function) or namespace is None or \
            namespace.get(name) is not function:
        raise ValueError("must be a function defined at the top level of a module or of the "
                         "settings file (the workers find it by its name)")
    module_name = function.__module__ or ""
    module = sys.modules.get(module_name)
    if module is not None and module_name != "__main__" and _MODULE.match(module_name) and \
            getattr(module, "__dict__", None) is namespace:
        return f"{module_name}:{name}"
    path = namespace.get("__file__")
    if not path or not str(path).endswith(".py"):
        raise ValueError("must be a function of an importable module or of a .py file")
    return f"{os.path.abspath(path)}:{name}"


def resolve(reference: str | Callable[..., Any]) -> Callable[..., Any]:
    """The function a reference names (a function is returned as it is)."""
    if callable(reference):
        return reference
    where, _, name = reference.rpartition(":")
    if where.endswith(".py"):
        namespace = _FILES.get(where)
        if namespace is None:
            try:
                namespace = _FILES[where] = runpy.run_path(where)
            except Exception as error:
                raise UnresolvedReference(f"cannot run {where}: {type(error).__name__}: "
                                      f"{error}") from None
    else:
        try:
            namespace = vars(importlib.import_module(where))
        except Exception as error:
            raise UnresolvedReference(f"cannot import {where!r}: {type(error).__name__}: "
                                  f"{error}") from None
    function = namespace.get(name)
    if not callable(function):
        raise UnresolvedReference(f"{where} has no function {name!r}")
    return function


def arguments_taken(function: Callable[..., Any], most: int, fewest: int) -> int:
    """How many positional arguments, from ``most`` down to ``fewest``, ``function``
    accepts; ValueError if it accepts none of those counts."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return most  # a builtin without a signature: let the call say
    for count in range(most, fewest - 1, -1):
        try:
            signature.bind(*range(count))
            return count
        except TypeError:
            continue
    wanted = str(most) if most == fewest else f"{fewest} to {most}"
    raise ValueError(f"must accept {wanted} positional arguments")

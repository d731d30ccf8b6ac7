"""Finding the WSGI applications a worker serves.

An application is named ``MODULE:CALLABLE``, or ``MODULE:FACTORY()`` for a
function that returns it. The settings ``chdir`` (put first on ``sys.path``
and made the working directory) and ``virtualenv`` (its site-packages added)
apply before anything is imported. Every failure is an :class:`AppLoadError`
whose message is one line naming the application and what went wrong.
"""

from __future__ import annotations

import glob
import importlib
import os
import site
import sys
from typing import Any, Callable

__all__ = ["AppLoadError", "prepare_path", "load_app", "load_mounts"]


class AppLoadError(Exception):
    """An application could not be imported; the message is one line."""


def prepare_path(chdir: str, virtualenv: str = "") -> None:
    """Make ``chdir`` the working directory and first on sys.path; add a virtualenv."""
    if virtualenv:
        found = glob.glob(os.path.join(virtualenv, "lib", "python*", "site-packages"))
        if not found:
            raise AppLoadError(f"setting 'virtualenv': no lib/python*/site-packages in "
                               f"{virtualenv}")
        for directory in found:
            site.addsitedir(directory)
    if chdir:
        try:
            os.chdir(chdir)
        except OSError as error:
            raise AppLoadError(f"setting 'chdir': cannot enter {chdir}: "
                               f"{error.strerror}") from None
        if chdir in sys.path:
            sys.path.remove(chdir)
        sys.path.insert(0, chdir)


def load_app(spec: str) -> Callable[..., Any]:
    """Import the application named by ``spec`` (``MODULE:CALLABLE`` or ``MODULE:FACTORY()``)."""
    module_name, _, name = spec.partition(":")
    factory = name.endswith("()")
    name = name[:-2] if factory else name
    if not module_name or not name.isidentifier():
        raise AppLoadError(f"application {spec!r}: expected MODULE:CALLABLE or MODULE:FACTORY()")
    try:
        module = importlib.import_module(module_name)
    except Exception as error:
        raise AppLoadError(f"application {spec!r}: cannot import {module_name!r}: "
                           f"{type(error).__name__}: {error}") from None
    try:
        app = getattr(module, name)
    except AttributeError:
        raise AppLoadError(f"application {spec!r}: module {module_name!r} has no "
                           f"attribute {name!r}") from None
    if factory:
        try:
            app = app()
        except Exception as error:
            raise AppLoadError(f"application {spec!r}: the factory failed: "
                               f"{type(error).__name__}: {error}") from None
    if not callable(app):
        raise AppLoadError(f"application {spec!r}: {type(app).__name__} object is not callable")
    return app


def load_mounts(mounts: tuple[tuple[str, str], ...]) -> list[tuple[str, Callable[..., Any]]]:
    """(prefix, application) for each ``PREFIX=APP`` mount."""
    return [(prefix, load_app(spec)) for prefix, spec in mounts]

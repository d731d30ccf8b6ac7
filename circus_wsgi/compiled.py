"""Which modules a wheel has compiled by mypyc (setup.py reads :data:`HOT_MODULES`), and
which of them this process runs compiled. Imports nothing of the package."""

from __future__ import annotations

import sys

#: The modules on the path of every request: compiled where the wheel was built with a
#: C compiler; their Python source is the same code, and the whole package without one.
HOT_MODULES = ("protocol", "wsgi", "framing", "accesslog", "worker", "dispatcher", "broker",
               "flowcontrol", "board", "tallies", "zmtp", "dispatch_protocol", "admission")


def compiled_modules() -> list[str]:
    """The hot modules imported so far that run compiled (extension modules)."""
    names = []
    for name in HOT_MODULES:
        module = sys.modules.get(f"circus_wsgi.{name}")
        if module is not None and str(getattr(module, "__file__", "")).endswith(".so"):
            names.append(name)
    return names

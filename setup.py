"""The package is declared in pyproject.toml; this adds the compiled modules.

A wheel (``pip install circus-wsgi``, ``pip wheel .``) gets the modules every request
runs through compiled by mypyc, beside their Python source: the same code, typed as
mypy checks it, running faster (docs/benchmarks.rst). Where that cannot be done (no C
compiler, or ``CIRCUS_WSGI_COMPILE=0``), the build goes on with the Python modules
alone, which are the whole package. An editable install (``pip install -e``) is never
compiled, so that edits take effect; ``make test-compiled`` compiles a checkout in
place to run the tests on the compiled modules.
"""

from __future__ import annotations

import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "circus_wsgi"))
from compiled import HOT_MODULES  # noqa: E402  (the package's own list, importing nothing)

#: The setup.py commands that build extension modules.
BUILDING = {"bdist_wheel", "build", "build_ext", "install"}


class OptionalBuildExt(build_ext):
    """Builds every compiled module, or none: then it warns, and the package is pure."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as error:  # no compiler, a compiler error
            for path in self.get_outputs():
                if os.path.exists(path):
                    os.remove(path)
            _pure(f"not compiled ({error})")


def _pure(why: str) -> None:
    print(f"circus-wsgi: {why}: installing the pure-Python modules", file=sys.stderr)


def compiled_modules() -> list:
    if os.environ.get("CIRCUS_WSGI_COMPILE", "1") == "0" or not BUILDING & set(sys.argv[1:]):
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        _pure("mypyc is not installed")
        return []
    try:
        return mypycify([f"circus_wsgi/{name}.py" for name in HOT_MODULES], opt_level="3",
                        group_name="circus_wsgi._hot")
    except (Exception, SystemExit) as error:  # mypyc reports type errors with an exit
        _pure(f"mypyc failed ({error})")
        return []


setup(ext_modules=compiled_modules(), cmdclass={"build_ext": OptionalBuildExt})

"""What another user (``nobody``) needs to run the stack: an interpreter and packages it can
read, and the test applications.

The tests' own interpreter may live where no other user can reach it (a pyenv under
/root, 0700), so :func:`runtime` builds one under /tmp, readable by all, laid out as a
deployment is (``ROOT/venv``, ``ROOT/src``): a virtualenv of the system's Python of the
same version (``--without-pip``) holding copies of circus_wsgi and of the packages the
stack's processes import, with the commands circus-wsgi, circusd and circusctl as pip
would write them, the mongrel2 make deps unpacked into the tests' environment if it did
(Debian 13: the venv's own ``mongrel2`` prefix, the setting's default), and a copy of
tests/serve_apps.py in ``src``. It is deleted afterwards.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import circus

from circus_wsgi.mongrel2_binary import PREFIX as MONGREL2_PREFIX
from harness import PROJECT_DIR, TESTS_DIR

#: What the stack's processes import, as entries of site-packages (wheels' bundled
#: libraries and metadata included).
PACKAGES = ("circus", "circus-*.dist-info", "zmq", "pyzmq.libs", "pyzmq-*.dist-info",
            "tornado", "tornado-*.dist-info", "psutil", "psutil-*.dist-info", "tnetstring",
            "tnetstring3-*.dist-info", "mypy_extensions.py", "mypy_extensions-*.dist-info")


#: The commands pip would install, and what they run.
COMMANDS = {"circus-wsgi": "circus_wsgi.cli", "circusd": "circus.circusd",
            "circusctl": "circus.circusctl"}


@dataclass(frozen=True)
class Runtime:
    python: Path  # the interpreter, as circus-wsgi's processes will see sys.executable
    apps: Path  # a chdir holding serve_apps.py

    def command(self, *args: str) -> list[str]:
        """``circus-wsgi ARGS`` run by this runtime."""
        return [str(self.python), "-m", "circus_wsgi", *args]

    @property
    def env(self) -> dict[str, str]:
        """The environment for it: the tests' own path left out."""
        return {**os.environ, "PYTHONPATH": str(self.apps), "PYTHONUNBUFFERED": "1"}


@contextlib.contextmanager
def runtime(root: Path | None = None) -> Iterator[Runtime]:
    """Build the runtime in ``root`` (default: a fresh directory, deleted afterwards)."""
    version = "python%d.%d" % sys.version_info[:2]
    system_python = shutil.which(version, path="/usr/bin:/bin")
    if system_python is None:
        raise RuntimeError(f"no system {version} for a runtime other users can read")
    made = root is None
    root = Path(tempfile.mkdtemp(prefix="cw-rt-", dir="/tmp")) if root is None else root
    try:
        venv = root / "venv"
        subprocess.run([system_python, "-m", "venv", "--without-pip", str(venv)],
                       check=True, capture_output=True, timeout=60)
        site = venv / "lib" / version / "site-packages"
        installed = Path(circus.__file__).resolve().parent.parent
        for pattern in PACKAGES:
            for entry in installed.glob(pattern):
                if entry.is_dir():
                    shutil.copytree(entry, site / entry.name, symlinks=True)
                else:
                    shutil.copy2(entry, site / entry.name)
        shutil.copytree(PROJECT_DIR / "circus_wsgi", site / "circus_wsgi",
                        ignore=shutil.ignore_patterns("__pycache__"))
        if MONGREL2_PREFIX.is_dir():
            shutil.copytree(MONGREL2_PREFIX, venv / MONGREL2_PREFIX.name, symlinks=True)
        for name, module in COMMANDS.items():
            script = venv / "bin" / name
            script.write_text(f"#!{venv / 'bin' / 'python'}\nimport sys\n"
                              f"from {module} import main\nsys.exit(main())\n")
            script.chmod(0o755)
        (root / "src").mkdir(exist_ok=True)
        shutil.copy(TESTS_DIR / "serve_apps.py", root / "src")
        subprocess.run(["chmod", "-R", "a+rX", str(root)], check=True, timeout=60)
        yield Runtime(venv / "bin" / "python", root / "src")
    finally:
        if made:
            shutil.rmtree(root, ignore_errors=True)

"""glibc malloc tuning (circus_wsgi.memory)."""

from __future__ import annotations

import subprocess
import sys


def test_the_thresholds_apply_on_glibc():
    code = ("from circus_wsgi.memory import tune_malloc; import sys; "
            "sys.exit(0 if tune_malloc() else 1)")
    assert subprocess.run([sys.executable, "-c", code], timeout=30).returncode == 0

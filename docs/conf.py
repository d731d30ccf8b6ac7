"""Sphinx configuration. The settings and command-line references are rendered
from the code by the extension in _ext/ (see circus_wsgi_docs.py)."""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE / "_ext"), str(HERE.parent)]

from circus_wsgi import __version__  # noqa: E402

project = "circus-wsgi"
author = "circus-wsgi contributors"
release = version = __version__

extensions = ["sphinx.ext.autodoc", "circus_wsgi_docs"]
exclude_patterns = ["_build"]
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
html_theme = "alabaster"
html_static_path: list[str] = []
smartquotes = False  # keep quotes in commands and help text as typed

"""The docs build without a warning and cover the code they describe.

The docs are built once, with ``sphinx-build -W``, into a temporary directory
that is deleted afterwards. The settings page must show every setting, the
command-line page every subcommand and flag, and no page may mention a
``circus-wsgi`` flag that the command does not have.
"""

from __future__ import annotations

import argparse
import posixpath
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import pytest
from sphinx.util.inventory import InventoryFile

import doc_blocks
from circus_wsgi.cli import build_parser
from circus_wsgi.rundir import RunDir
from circus_wsgi.settings import SETTINGS

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def sphinx_build(source: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
         str(source), str(out)],
        capture_output=True, text=True, timeout=120)


class _Text(HTMLParser):
    """The visible text of an HTML page."""

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag, attrs):
        self._skip += tag in ("script", "style")

    def handle_endtag(self, tag):
        self._skip -= tag in ("script", "style")

    def handle_data(self, data):
        if not self._skip:
            self.parts.append(data)


def page_text(path: Path) -> str:
    """A built page's visible text, whitespace collapsed."""
    parser = _Text()
    parser.feed(path.read_text())
    return " ".join("".join(parser.parts).split())


@dataclass
class Built:
    stderr: str
    pages: dict[str, str]  # page name -> visible text
    inventory: dict  # what the docs declare (Sphinx's objects.inv): {type: {name: entry}}


@pytest.fixture(scope="module")
def built() -> Built:
    with tempfile.TemporaryDirectory(prefix="cw-docs-") as tmp:
        out = Path(tmp)
        result = sphinx_build(DOCS, out)
        assert result.returncode == 0, f"the docs did not build:\n{result.stderr}"
        with open(out / "objects.inv", "rb") as stream:
            inventory = InventoryFile.load(stream, "", posixpath.join)
        pages = {path.stem: page_text(path) for path in out.glob("*.html")}
    return Built(result.stderr, pages, inventory)


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def cli_spelling(name: str) -> str:
    """How the command line spells a setting: its flag, or the positional's metavar."""
    action = next(a for a in subcommands()["serve"]._actions if a.dest == name)
    return action.option_strings[0] if action.option_strings else action.metavar


def test_docs_build_without_a_word_on_stderr(built):
    assert built.stderr == ""
    assert "make test" in built.pages["index"]  # the README is the front page


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.name)
def test_settings_page_shows_every_setting(built, setting):
    text = built.pages["settings"]
    assert cli_spelling(setting.name) in text
    assert " ".join(setting.help.split()) in text


def test_settings_page_has_one_entry_per_setting(built):
    assert set(built.inventory["std:setting"]) == {s.name for s in SETTINGS}


def test_cli_page_documents_every_subcommand_and_argument(built):
    text = built.pages["cli"]
    documented = set(built.inventory["std:cmdoption"])
    for name, parser in subcommands().items():
        assert f"circus-wsgi {name}" in text
        for action in parser._actions:
            for spelling in action.option_strings or [action.metavar]:
                # Sphinx names an option PROGRAM.OPTION, spaces in PROGRAM made dashes
                names = {f"circus-wsgi-{name}.{spelling}", f"circus-wsgi.{spelling}"}
                assert names & documented, f"circus-wsgi {name} {spelling} is not documented"


def without_other_programs(text: str) -> str:
    """A page's text with the shell commands of other programs than circus-wsgi left out
    (their flags are theirs: ``useradd --system``)."""
    for block in doc_blocks.blocks(text):
        if block.language in doc_blocks.SHELLS:
            ours = [c for c in block.commands if doc_blocks.program(c) == "circus-wsgi"]
            text = text.replace(block.source, "\n".join(ours) + "\n")
    return text


def test_docs_mention_only_flags_the_command_has():
    """Every ``--flag`` written in the README and the docs, outside the commands of
    other programs, is one of circus-wsgi's (circus-top's ``--endpoint`` shares its name
    with circus-wsgi's). The benchmark page is left out: it quotes the peers' and the
    benchmark runner's command lines."""
    known = {flag for parser in subcommands().values()
             for action in parser._actions for flag in action.option_strings}
    pages = [path for path in sorted(DOCS.glob("*.rst")) if path.name != "benchmarks.rst"]
    for path in [ROOT / "README.rst", *pages]:
        text = without_other_programs(path.read_text())
        flags = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text))
        assert flags <= known, f"{path.name} mentions {sorted(flags - known)}"


def test_other_programs_flags_are_left_out_but_ours_are_checked():
    page = ".. code-block:: sh\n\n   useradd --system x\n   circus-wsgi serve a:b \\\n" \
           "       --no-such-flag\n\nText with ``--prose-flag``.\n"
    text = without_other_programs(page)
    assert "--system" not in text and "--no-such-flag" in text and "--prose-flag" in text


def test_operations_page_names_the_real_sockets(built):
    text = built.pages["operations"]
    run = RunDir(Path("/run-dir"))
    for endpoint in (run.circus_endpoint, run.circus_stats):
        assert Path(endpoint).name in text


def test_a_reference_to_a_missing_setting_fails_the_build():
    with tempfile.TemporaryDirectory(prefix="cw-docs-") as tmp:
        source = Path(tmp, "src")
        source.mkdir()
        (source / "conf.py").write_text(
            f"import sys\nsys.path.insert(0, {str(DOCS / '_ext')!r})\n"
            "extensions = ['circus_wsgi_docs']\n")
        (source / "index.rst").write_text("Index\n=====\n\nSee :setting:`no_such_setting`.\n")
        result = sphinx_build(source, Path(tmp, "out"))
    assert result.returncode != 0
    assert "no_such_setting" in result.stderr

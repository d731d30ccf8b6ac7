"""The code blocks of a reST page, and the commands of its shell blocks, as a test runs them.

A block is ``.. code-block:: LANGUAGE`` with an optional ``:name:`` (how a test finds
it), its body dedented. A shell block's commands are its lines, a line ending in ``\\``
joined to the next, comments and blank lines left out.
"""

from __future__ import annotations

import re
import shlex
import textwrap
from dataclasses import dataclass
from pathlib import Path

SHELLS = ("sh", "bash", "shell", "console")
_BLOCK = re.compile(
    r"^(?P<indent>[ ]*)\.\. code-block:: (?P<language>\S+)\n"
    r"(?P<options>(?:(?P=indent)[ ]+:[\w-]+:.*\n)*)"
    r"(?P<body>(?:[ ]*\n|(?P=indent)[ ]+\S.*\n)+)", re.M)


@dataclass(frozen=True)
class Block:
    language: str
    name: str
    body: str
    source: str  # the block as the page spells it

    @property
    def commands(self) -> list[str]:
        joined = re.sub(r"\\\n\s*", " ", self.body)
        return [line.strip() for line in joined.splitlines()
                if line.strip() and not line.lstrip().startswith("#")]


def blocks(text: str) -> list[Block]:
    """Every code block of a page's reST ``text``, in order."""
    found = []
    for match in _BLOCK.finditer(text):
        name = re.search(r":name:\s*(\S+)", match["options"])
        found.append(Block(match["language"], name.group(1) if name else "",
                           textwrap.dedent(match["body"]).strip("\n") + "\n", match[0]))
    return found


def named(path: Path) -> dict[str, Block]:
    """The page's named blocks, by name."""
    return {block.name: block for block in blocks(path.read_text()) if block.name}


def program(command: str) -> str:
    """The name of the program a shell command runs."""
    return Path(shlex.split(command)[0]).name

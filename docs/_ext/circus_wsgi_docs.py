"""Sphinx directives that render references straight from the code.

``.. circus-wsgi-settings::`` renders :data:`circus_wsgi.settings.SETTINGS`:
one ``setting`` entry per option, grouped by section in declaration order.
``.. circus-wsgi-cli::`` renders the parser that ``circus-wsgi`` itself uses
(:func:`circus_wsgi.cli.build_parser`); ``.. circus-wsgi-modules::`` lists the
package's modules with the first line of each docstring. Each directive makes
reST that Sphinx parses in place, so the docs change when the code does.

Setting entries are cross-reference targets: ``:setting:`run_dir``` links to
one, and a link to a setting that does not exist is a warning (an error under
``sphinx-build -W``).
"""

from __future__ import annotations

import argparse
import ast
import re
from pathlib import Path
from typing import Any, Iterable

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.application import Sphinx
from sphinx.roles import XRefRole
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles

import circus_wsgi
from circus_wsgi.cli import build_parser
from circus_wsgi.settings import SETTINGS, Setting, _render

_RST_SPECIAL = re.compile(r"([\\`*_|\[\]<>])")
# Only names with an underscore are linked in help text: "workers" is also a word.
# ("limits.content_length" names mongrel2's setting, not ours: no link after a dot; nor
# in "on_exit(server)", a hook's signature.)
_LINKABLE = re.compile(
    r"(?<![\w.])(" + "|".join(s.name for s in SETTINGS if "_" in s.name) + r")(?![\w.]\w|\()")


def _escape(text: str) -> str:
    return _RST_SPECIAL.sub(r"\\\1", text)


def _prose(text: str) -> str:
    """Help text as reST: escaped, with setting names linked to their entries."""
    parts = _LINKABLE.split(text)  # odd items are the setting names matched
    return "".join(f":setting:`{part}`" if index % 2 else _escape(part)
                   for index, part in enumerate(parts))


def _subcommands() -> tuple[dict[str, argparse.ArgumentParser], dict[str, str]]:
    """The subcommands' parsers and one-line summaries, by name."""
    action = next(a for a in build_parser()._actions
                  if isinstance(a, argparse._SubParsersAction))
    return action.choices, {a.dest: a.help or "" for a in action._choices_actions}


class _GeneratedDirective(SphinxDirective):
    """A directive whose body is reST made from code, parsed where it stands."""

    has_content = False

    def lines(self) -> Iterable[str]:
        raise NotImplementedError

    def run(self) -> list[nodes.Node]:
        source = self.get_source_info()[0] or "<generated>"
        content = StringList()
        for number, line in enumerate(self.lines()):
            content.append(line, source, number)
        container = nodes.section()
        container.document = self.state.document
        nested_parse_with_titles(self.state, content, container)
        return container.children


class SettingsDirective(_GeneratedDirective):
    """Every setting, grouped by section, with its flag, kind, default and help."""

    def lines(self) -> Iterable[str]:
        parser = next(iter(_subcommands()[0].values()))
        spellings = {a.dest: a for a in parser._actions}
        sections: dict[str, list[Setting]] = {}
        for setting in SETTINGS:
            sections.setdefault(setting.section, []).append(setting)
        for section, settings in sections.items():
            title = section.capitalize()
            yield from (title, "-" * len(title), "")
            for setting in settings:
                yield from _setting_lines(setting, spellings[setting.name])


def _setting_lines(setting: Setting, action: argparse.Action) -> Iterable[str]:
    if action.option_strings and action.nargs == 0:  # a switch
        flag = f"``{action.option_strings[0]}``"
    elif action.option_strings:
        flag = f"``{action.option_strings[0]} {action.metavar}``"
    else:
        flag = f"``{action.metavar}`` (the positional argument)"
    yield f".. setting:: {setting.name}"
    yield ""
    yield f"   :Flag: {flag}" + (", repeatable" if setting.repeat else "")
    yield f"   :Value: {_escape(setting.kind)}"
    yield f"   :Default: {_default(setting.default)}"
    yield ""
    yield f"   {_prose(setting.help)}"
    yield ""


def _default(value: Any) -> str:
    return "none" if value in ((), "", None) else f"``{_render(value)}``"


class CliDirective(_GeneratedDirective):
    """The ``circus-wsgi`` command: each subcommand and every argument its parser takes."""

    def lines(self) -> Iterable[str]:
        commands, summaries = _subcommands()
        names = {s.name for s in SETTINGS}
        own = {name: [a for a in sub._actions if a.dest not in names or not a.option_strings]
               for name, sub in commands.items()}
        with_settings = [actions for name, actions in own.items()
                         if any(a.dest == "settings" for a in actions)]
        common = [a for a in with_settings[0]
                  if all(_signature(a) in map(_signature, actions) for actions in with_settings)]
        flags = _setting_flags(next(iter(commands.values())), names)

        yield from (".. code-block:: text", "")
        yield from ("   " + line for line in build_parser().format_usage().strip().splitlines())
        yield ""
        for name, sub in commands.items():
            title = f"circus-wsgi {name}"
            positionals_first = sorted(own[name], key=lambda a: bool(a.option_strings))
            usage = " ".join(_usage(a) for a in positionals_first if a.nargs != 0)
            taken = _setting_flags(sub, names)
            settings_usage = " [SETTING FLAGS]" if taken else ""
            yield from (title, "-" * len(title), "", _escape(summaries[name]), "")
            yield from (".. code-block:: text", "",
                        f"   circus-wsgi {name} {usage}{settings_usage}", "")
            yield from (f".. program:: circus-wsgi {name}", "")
            for action in own[name]:
                if _signature(action) not in map(_signature, common):
                    yield from _option_lines(sub, action)
            if taken and [a.dest for a, _ in taken] != [a.dest for a, _ in flags]:
                yield "Setting flags it takes: " + ", ".join(
                    f"``{a.option_strings[0]}``" for a, _ in taken) + "."
                yield ""
        yield from _shared_lines(next(iter(commands.values())), common, flags)


def _shared_lines(parser: argparse.ArgumentParser, common: list[argparse.Action],
                  flags: list[tuple[argparse.Action, str]]) -> Iterable[str]:
    """The arguments every subcommand takes, setting flags grouped as the parser groups them."""
    title = "Arguments of every subcommand that takes settings"
    yield from (title, "-" * len(title), "")
    yield from (".. program:: circus-wsgi", "")
    for action in common:
        yield from _option_lines(parser, action)
    yield ("Each setting flag below sets the setting of the same name (see :doc:`settings`) "
           "and overrides the value from ``--settings FILE``.")
    yield ""
    group = None
    for action, title in flags:
        if title != group:
            group = title
            yield from (title.capitalize(), "~" * len(title), "")
        yield from _option_lines(parser, action)


def _signature(action: argparse.Action) -> tuple[str, ...]:
    return tuple(action.option_strings) or (action.dest,)


def _setting_flags(parser: argparse.ArgumentParser,
                   names: set[str]) -> list[tuple[argparse.Action, str]]:
    """The setting flags of ``parser`` with the title of their argument group."""
    return [(action, group.title or "") for group in parser._action_groups
            for action in group._group_actions
            if action.option_strings and action.dest in names]


def _usage(action: argparse.Action) -> str:
    """An argument that takes a value, as a usage line shows it."""
    if action.option_strings:
        text = f"{action.option_strings[-1]} {action.metavar or action.dest.upper()}"
        return text if action.required else f"[{text}]"
    text = action.metavar or action.dest
    return f"[{text}]" if action.nargs == "?" else text


def _option_lines(parser: argparse.ArgumentParser, action: argparse.Action) -> Iterable[str]:
    if action.option_strings:
        metavar = "" if action.nargs == 0 else " " + (action.metavar or action.dest.upper())
        signature = ", ".join(flag + metavar for flag in action.option_strings)
    else:
        signature = action.metavar or action.dest
    help_text = parser._get_formatter()._expand_help(action) if action.help else ""
    if action.required:
        help_text += " (required)"
    if isinstance(action, argparse._AppendAction):
        help_text += " May be given more than once."
    yield f".. option:: {signature}"
    yield ""
    yield f"   {_prose(help_text)}"
    yield ""


class ModulesDirective(_GeneratedDirective):
    """The package's modules, each with the first line of its docstring (reST).

    Docstrings are read with :mod:`ast`, so no module is imported.
    """

    def lines(self) -> Iterable[str]:
        for path in sorted(Path(circus_wsgi.__file__).parent.glob("*.py")):
            if not path.stem.startswith("_"):
                docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
                yield f"- ``{path.name}``: {docstring.partition(chr(10))[0]}"


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_object_type("setting", "setting", indextemplate="pair: %s; setting")
    app.add_role_to_domain("std", "setting", XRefRole(warn_dangling=True), override=True)
    app.add_directive("circus-wsgi-settings", SettingsDirective)
    app.add_directive("circus-wsgi-cli", CliDirective)
    app.add_directive("circus-wsgi-modules", ModulesDirective)
    return {"parallel_read_safe": True, "parallel_write_safe": True}

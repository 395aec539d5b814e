"""The documentation stays true to the code: every subcommand and option of the command line is
described in docs/cli.md (a new option without a line there fails here), and README's links lead
to files that exist."""
import argparse
import os
import re

import pytest

from aprender.cli import build_parser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _subcommands():
    parser = build_parser()
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return subs[0].choices


def _read(*parts):
    with open(os.path.join(ROOT, *parts), encoding="utf-8") as f:
        return f.read()


@pytest.mark.parametrize("command", sorted(_subcommands()))
def test_every_option_is_in_cli_md(command):
    doc = _read("docs", "cli.md")
    assert f"## {command}" in doc, f"docs/cli.md has no section for '{command}'"
    section = doc.split(f"## {command}", 1)[1].split("\n## ", 1)[0]
    if command == "shrink":  # its options are described in docs/shrink.md
        section += _read("docs", "shrink.md")
    sub = _subcommands()[command]
    missing = [s for a in sub._actions for s in a.option_strings
               if s.startswith("--") and s != "--help" and f"`{s}" not in section
               and f" {s}" not in section]
    assert not missing, f"aprender {command}: options not described in docs: {missing}"


def test_readme_and_docs_links_exist():
    for name in ["README.md"] + [os.path.join("docs", f) for f in os.listdir(
            os.path.join(ROOT, "docs")) if f.endswith(".md")]:
        base = os.path.dirname(os.path.join(ROOT, name))
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", _read(name)):
            if "://" in target:
                continue
            assert os.path.exists(os.path.join(base, target)), f"{name} links to {target}"

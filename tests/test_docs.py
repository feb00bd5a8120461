"""The README and docs/ stay short, current and true to the CLI.

- README.md stays under README_MAX_LINES and keeps the CI markers (.ci/run reads the test
  command between them);
- no page tells development history ("no longer", "was 0.67x ... now 0.28x", "session 3");
- every `attnx <command> --flag` named in a code span or code block is a flag of the real
  parser, built the way the console script builds it.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 200  # the README must have fewer lines than this

CI_MARKERS = (
    "<!-- main-command -->",
    "<!-- /main-command -->",
    "<!-- test-command -->",
    "<!-- /test-command -->",
)

HISTORY = [
    r"\bno longer\b",
    r"\bwas [0-9.]+x\b.{0,200}?\bnow\b",
    r"\(was\b",
    r"\bsession [0-9]",
    r"\bbefore this change\b",
    r"\bearlier runs?\b",
    r"\bthose were\b",
    r"\bchanged since\b",
]

FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
SPAN = re.compile(r"`([^`]+)`")
COMMAND = re.compile(r"\battnx\s+([a-z]+)")
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def history_phrases(text: str) -> list[str]:
    """Every development-history phrase in ``text`` (whitespace collapsed, any case)."""
    flat = " ".join(text.split())
    return [m.group(0) for p in HISTORY for m in re.finditer(p, flat, re.I)]


def command_snippets(markdown: str) -> list[str]:
    """The text of every `attnx <command> ...` in a code span or fenced block.

    In a fenced block a command runs to the end of its line plus the indented lines after it
    (wrapped usage lines); in a code span, to the end of the span.
    """
    snippets = []
    for block in FENCE.findall(markdown):
        wrapped = False  # whether the last line ended inside an attnx command
        for line in block.splitlines():
            if wrapped and line[:1].isspace():
                snippets[-1] += " " + line.strip()
                continue
            found = _split_commands(line)
            snippets += found
            wrapped = bool(found)
    for span in SPAN.findall(FENCE.sub("", markdown)):
        snippets.extend(_split_commands(span))
    return snippets


def _split_commands(text: str) -> list[str]:
    starts = [m.start() for m in COMMAND.finditer(text)]
    if not starts:
        return []
    return [text[a:b] for a, b in zip(starts, [*starts[1:], len(text)], strict=True)]


def unknown_flags(markdown: str, commands: dict[str, set[str]]) -> list[str]:
    """'attnx CMD --flag' for every flag (or command) that the parser does not have."""
    problems = []
    for snippet in command_snippets(markdown):
        command = COMMAND.match(snippet).group(1)
        if command not in commands:
            problems.append(f"attnx {command}: no such command")
            continue
        problems += [f"attnx {command} {flag}" for flag in FLAG.findall(snippet)
                     if flag not in commands[command]]
    return problems


@pytest.fixture(scope="module")
def cli_flags() -> dict[str, set[str]]:
    """{command: its option strings}, from the parser the `attnx` console script builds."""
    from export._cli import add_commands
    from runtime._cli import build_parser

    parser = build_parser(add_commands)
    choices = parser._subparsers._group_actions[0].choices
    return {name: set(sub._option_string_actions) for name, sub in choices.items()}


def test_readme_is_short():
    lines = len(README.read_text().splitlines())
    assert lines < README_MAX_LINES, f"README.md has {lines} lines; move detail into docs/"


def test_readme_keeps_ci_markers():
    lines = [line.strip() for line in README.read_text().splitlines()]
    missing = [marker for marker in CI_MARKERS if marker not in lines]
    assert not missing, f"README.md lost the CI marker lines {missing}"
    test_command = lines[lines.index(CI_MARKERS[2]) + 1:lines.index(CI_MARKERS[3])]
    assert test_command[0] == test_command[-1] == "```" and "pytest" in test_command[1]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_development_history(page):
    found = history_phrases(page.read_text())
    assert not found, f"{page.name} tells history, not the product: {found}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_named_flags_exist(page, cli_flags):
    problems = unknown_flags(page.read_text(), cli_flags)
    assert not problems, f"{page.name} names what the CLI lacks: {problems}"


def test_pages_name_commands():
    """Guards the extraction itself: the README's command table must be seen."""
    commands = {COMMAND.match(s).group(1) for s in command_snippets(README.read_text())}
    assert {"export", "check", "verify", "run", "bench", "serve", "triton"} <= commands


@pytest.mark.parametrize("text", [
    "`attnx export --all --no-such-flag`",
    "```\nattnx serve BUNDLE [--replicas N]\n      [--no-such-flag]\n```\n",
    "`attnx frobnicate --all`",
], ids=["span", "wrapped-block-line", "unknown-command"])
def test_flag_check_reports_what_the_cli_lacks(text, cli_flags):
    assert unknown_flags(text, cli_flags)


@pytest.mark.parametrize("text", [
    "padding no longer needs a copy",
    "int8 was 0.67x at batch 1, and\nshaw_relative 0.60x; now 0.28x",
    "Those were session 3's graphs",
    "as in earlier runs",
], ids=["no-longer", "was-now", "session", "earlier-run"])
def test_history_check_reports_history(text):
    assert history_phrases(text)

"""The pages the docs build generates: the CLI reference, the API reference pages and the
results.

Plain functions with no MkDocs in them; ``docs/gen_pages.py`` (run by mkdocs-gen-files, as
mkdocs.yml says) writes what :func:`generated_pages` returns, and ``tests/test_docs.py``
checks the same text against the parser.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "structprune"
CLI_PAGE = "reference/cli.md"
USAGE_WIDTH = 96
# the API reference: one page per subpackage of the pass, and one for the leaf modules
API_PAGES = {"core": "The pass", "accuracy": "Accuracy", "deploy": "Deployment",
             "front": "Front: CLI, run folders, models"}
LEAVES_PAGE = "reference/api/leaves.md"
# modules listed first, in pipeline order, where a package has them; the rest follow by name
READING_ORDER = ["registry", "rules", "capture", "analyse", "criteria", "score", "plan", "apply",
                 "literals", "verify", "counts", "api", "data", "export", "bench", "runtimes",
                 "latency", "widths", "tune", "speed"]


def commands(parser: argparse.ArgumentParser,
             path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], str,
                                                           argparse.ArgumentParser]]:
    """Every command under ``parser``, depth first: its words, its help and its parser."""
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
        seen = set()
        for name, sub in action.choices.items():
            if id(sub) in seen:  # an alias of a command already listed
                continue
            seen.add(id(sub))
            yield path + (name,), helps.get(name, ""), sub
            yield from commands(sub, path + (name,))


def documented(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The arguments of one command that its reference lists (not -h, not subcommands)."""
    return [a for a in parser._actions
            if not isinstance(a, argparse._HelpAction | argparse._SubParsersAction)
            and a.help != argparse.SUPPRESS]


def escape(text: str) -> str:
    """Markdown-safe prose for a table cell; `code spans` are kept as they are."""
    parts = re.split(r"(`[^`]*`)", " ".join(text.split()))
    return "".join(part if part.startswith("`") else
                   re.sub(r"([\\*_\[\]<>|])", r"\\\1", part) for part in parts)


def code(text: str) -> str:
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def value(action: argparse.Action, formatter: argparse.HelpFormatter) -> str:
    """What follows the flag: its metavar or choices, and whether it repeats."""
    if action.nargs == 0:
        return "switch"
    if not action.option_strings:  # a positional argument: its name says it
        return ""
    default = action.dest if not action.option_strings else action.dest.upper()
    text = code(formatter._format_args(action, default))
    return text + " (repeatable)" if isinstance(action, argparse._AppendAction) else text


def default_of(action: argparse.Action) -> str:
    if action.required:
        return "required"
    if action.nargs == 0 or action.default in (None, [], argparse.SUPPRESS):
        return ""
    return code(str(action.default))


def command_section(prog: str, words: tuple[str, ...], help_text: str,
                    parser: argparse.ArgumentParser) -> list[str]:
    """One command: its help, its usage line and a table per argument group."""
    formatter = argparse.HelpFormatter(parser.prog, width=USAGE_WIDTH)
    formatter.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups)
    lines = [f"## {' '.join((prog, *words))} {{#{'-'.join(words)}}}", ""]
    if help_text:
        lines += [escape(help_text[:1].upper() + help_text[1:]) + ".", ""]
    if parser.description:
        lines += [escape(parser.description), ""]
    lines += ["```text", formatter.format_help().strip(), "```", ""]
    shown = set(map(id, documented(parser)))
    for group in parser._action_groups:
        actions = [a for a in group._group_actions if id(a) in shown]
        if not actions:
            continue
        lines += [f"**{escape(group.title or 'options')}**", "",
                  "| argument | value | default | what it does |", "|---|---|---|---|"]
        for action in actions:
            names = ", ".join(code(s) for s in action.option_strings) or code(
                action.metavar or action.dest)
            help_cell = escape(formatter._expand_help(action)) if action.help else ""
            lines.append(f"| {names} | {value(action, formatter)} | {default_of(action)} "
                         f"| {help_cell} |")
        lines.append("")
    return lines


def cli_reference(parser: argparse.ArgumentParser) -> str:
    """The command line reference as markdown: every command, every argument and its help."""
    listed = list(commands(parser))
    lines = ["# Command line", "",
             "Generated from `structprune.front.cli.build_parser()` when the docs are built, "
             "so it lists exactly what the installed parser accepts; `structprune COMMAND "
             "--help` prints the same. Every command also takes `-h`/`--help`.", ""]
    if parser.description:
        lines += [escape(parser.description), ""]
    lines += ["| command | what it does |", "|---|---|"]
    lines += [f"| [{' '.join(words)}](#{'-'.join(words)}) | {escape(help_text)} |"
              for words, help_text, _ in listed]
    lines.append("")
    for words, help_text, sub in listed:
        lines += command_section(parser.prog, words, help_text, sub)
    return "\n".join(lines).rstrip() + "\n"


def public_modules(package: Path) -> list[str]:
    """Dotted names of a package's public modules and subpackages, as found on disk."""
    base = ".".join(package.relative_to(ROOT).parts)
    found = []
    rank = {name: i for i, name in enumerate(READING_ORDER)}
    for path in sorted(package.iterdir(), key=lambda p: (rank.get(p.stem, len(rank)), p.name)):
        if path.name.startswith("_"):
            continue
        if path.suffix == ".py":
            found.append(f"{base}.{path.stem}")
        elif (path / "__init__.py").exists():
            found.append(f"{base}.{path.name}")
    return found


def api_page(title: str, package: str | None, modules: list[str]) -> str:
    """A reference page: the package's docstring, then every module's public API."""
    lines = [f"# {title}", ""]
    if package:
        lines += [f"::: {package}", "    options:", "      members: false",
                  "      show_root_heading: false", ""]
    for module in modules:
        lines += [f"::: {module}", "    options:", "      heading_level: 2", ""]
    return "\n".join(lines)


def api_pages() -> dict[str, str]:
    """One page per subpackage (its modules as they are on disk), one for the leaf modules."""
    pages = {f"reference/api/{name}.md": api_page(
        f"{title} (structprune.{name})", f"structprune.{name}",
        public_modules(PACKAGE / name)) for name, title in API_PAGES.items()}
    leaves = [m for m in public_modules(PACKAGE)
              if m.rsplit(".", 1)[1] not in API_PAGES]
    pages[LEAVES_PAGE] = api_page("Shared types and errors", None, leaves)
    return pages


def tables_module():
    """``benchmarks/tables.py``, which renders the results (benchmarks is not a package)."""
    spec = importlib.util.spec_from_file_location("structprune_bench_tables",
                                                  ROOT / "benchmarks" / "tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def generated_pages() -> dict[str, str | bytes]:
    """Every generated file of the site, by its path under docs/: text pages and plots."""
    from structprune.front.cli import build_parser

    tables = tables_module()
    pages: dict[str, str | bytes] = {CLI_PAGE: cli_reference(build_parser())}
    pages.update(api_pages())
    pages.update({f"results/{name}": text for name, text in tables.pages().items()})
    pages.update({f"results/{name}": path.read_bytes()
                  for name, path in tables.images().items()})
    return pages

"""The docs stay true to the code: the CLI reference the docs build generates lists every
command and every flag of the parser with its help, the build is wired to generate it, and
the README's relative links point at files that exist."""

import argparse
import ast
import importlib.util
import re
from pathlib import Path

import pytest

from structprune.front.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
GEN_SCRIPT = "docs/gen_pages.py"


def _docs_pages():
    spec = importlib.util.spec_from_file_location("structprune_docs_pages",
                                                  ROOT / "docs" / "pages.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _arguments(parser: argparse.ArgumentParser) -> dict[str, list[argparse.Action]]:
    """Every command's arguments, walked here from the parser (not by the docs' own walk)."""
    found: dict[str, list[argparse.Action]] = {}
    todo = [((), parser)]
    while todo:
        words, current = todo.pop()
        for action in current._actions:
            if isinstance(action, argparse._SubParsersAction):
                todo += [((*words, name), sub) for name, sub in action.choices.items()]
            elif words and not isinstance(action, argparse._HelpAction) \
                    and action.help != argparse.SUPPRESS:
                found.setdefault(" ".join(words), []).append(action)
    return found


def _sections(reference: str) -> dict[str, str]:
    """The reference's text per command, markdown escapes removed."""
    parts = re.split(r"^## structprune (.+?) \{#[^}]*\}$", reference, flags=re.MULTILINE)
    return {name: re.sub(r"\\(.)", r"\1", text) for name, text in zip(parts[1::2], parts[2::2],
                                                                        strict=True)}


def _missing(reference: str, parser: argparse.ArgumentParser) -> list[str]:
    """What the parser has and the reference lacks: commands, flags, help texts."""
    sections = _sections(reference)
    arguments = _arguments(parser)
    missing = [f"command {c}" for c in arguments if c not in sections]
    for command, actions in arguments.items():
        text = sections.get(command, "")
        words = " ".join(text.split())
        for action in actions:
            missing += [f"{command} {flag}"
                        for flag in action.option_strings or [action.metavar or action.dest]
                        if f"`{flag}`" not in text]
            if action.help and "%" not in action.help \
                    and " ".join(action.help.split()) not in words:
                missing.append(f"{command} {action.dest}: its help")
    return missing


def test_cli_reference_lists_every_flag_of_every_command_with_its_help():
    parser = build_parser()
    reference = _docs_pages().cli_reference(parser)
    assert {"prune", "bench", "analyze"} <= set(_arguments(parser))
    assert set(_sections(reference)) == set(_arguments(parser))
    assert _missing(reference, parser) == []
    # and the check sees a flag, a help text or a command the reference lacks
    assert sorted(_missing(reference.replace("`--exact-only`", "`--exact`"), parser)) == \
        ["prune --exact-only", "sweep --exact-only"]
    assert _missing(reference.replace("fewest channels a group keeps", ""), parser) == \
        ["prune min_width: its help"]
    assert "command analyze" in _missing(reference.replace("## structprune analyze", "##"),
                                         parser)


def test_docs_build_generates_the_reference_from_the_parser():
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    plugins = {next(iter(p)) if isinstance(p, dict) else p: p for p in config["plugins"]}
    assert GEN_SCRIPT in plugins["gen-files"]["gen-files"]["scripts"]
    assert "mkdocstrings" in plugins
    nav = str(config["nav"])
    pages = _docs_pages()
    generated = pages.generated_pages()
    for name in generated:
        if name.endswith(".md"):
            assert name in nav, f"generated page {name} is not in mkdocs.yml's nav"
    assert generated[pages.CLI_PAGE] == pages.cli_reference(build_parser())
    # the script mkdocs-gen-files runs writes what generated_pages() returns
    calls = {node.func.attr for node in ast.walk(ast.parse((ROOT / GEN_SCRIPT).read_text()))
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)}
    assert {"generated_pages", "open"} <= calls


def test_docs_build_writes_the_reference_page(monkeypatch):
    """Run the gen-files step of the real build config (without building the site)."""
    pytest.importorskip("mkdocs_gen_files")
    from mkdocs.config import load_config
    from mkdocs.structure.files import Files

    monkeypatch.setenv("NO_MKDOCS_2_WARNING", "1")
    monkeypatch.setenv("DISABLE_MKDOCS_2_WARNING", "true")
    monkeypatch.chdir(ROOT)
    config = load_config(str(ROOT / "mkdocs.yml"))
    plugin = config.plugins["gen-files"]
    files = plugin.on_files(Files([]), config=config)
    try:
        written = Path(files.get_file_from_path("reference/cli.md").abs_src_path).read_text()
        assert written == _docs_pages().cli_reference(build_parser())
        assert files.get_file_from_path("results/latency.md") is not None
    finally:
        plugin.on_post_build(config=config)


def _links(markdown: str) -> list[str]:
    text = re.sub(r"```.*?```", "", markdown, flags=re.DOTALL)
    return re.findall(r"!?\[[^\]]*\]\(([^)\s]+)[^)]*\)", text)


def test_readme_links_point_at_files_that_exist():
    generated = set(_docs_pages().generated_pages())
    links = [link for link in _links(README.read_text())
             if not re.match(r"[a-z]+:|#", link)]
    assert any(link.startswith("docs/") for link in links)
    for link in links:
        path = link.split("#")[0]
        exists = (ROOT / path).exists() or path.removeprefix("docs/") in generated
        assert exists, f"README links to {link}, which does not exist"


def test_readme_is_short_and_keeps_the_two_commands():
    text = README.read_text()
    assert len(text.splitlines()) <= 200
    assert ("pip install -e . && structprune prune torchvision:vgg16 --ratio 0.5 --out "
            "out/vgg16 && structprune bench out/vgg16 --batch 1") in text
    assert 'pip install -e ".[test,timm,onnx]" && python -m pytest' in text

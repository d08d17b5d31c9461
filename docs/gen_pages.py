"""Run by mkdocs-gen-files during the docs build (mkdocs.yml names it): writes every page
that docs/pages.py generates into the build (nothing lands in the tree)."""

import importlib.util
from pathlib import Path

import mkdocs_gen_files

spec = importlib.util.spec_from_file_location("structprune_docs_pages",
                                              Path(__file__).with_name("pages.py"))
pages = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pages)

for name, content in pages.generated_pages().items():
    with mkdocs_gen_files.open(name, "wb" if isinstance(content, bytes) else "w") as out:
        out.write(content)

"""A griffe extension for the docs build (mkdocs.yml names it): the package's docstrings use
Sphinx roles (:class:`Plan`) and ``Example::`` blocks, and the site renders docstrings as
Markdown, so roles become code spans and ``::`` a colon."""

import re

import griffe

ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|data|attr|exc|obj|const):`~?([^`]+)`")
LITERAL_BLOCK = re.compile(r"::$", re.MULTILINE)


class SphinxRoles(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            text = ROLE.sub(r"`\1`", obj.docstring.value)
            obj.docstring.value = LITERAL_BLOCK.sub(":", text)

"""Embedded corpora that need no download.

``builtin:python-docs`` is English prose that ships with every CPython installation: the
docstrings of the standard library's modules, classes and functions (read with ``ast``, so
nothing is imported or executed) and the language reference topics in ``pydoc_data``.
On CPython 3.11 it is about 2.2 MB of text in about 8,400 documents.
"""

from __future__ import annotations

import ast
import functools
import sys
import sysconfig
import warnings
from collections.abc import Iterator
from pathlib import Path

BUILTIN_PREFIX = "builtin:"
CORPORA = ("python-docs",)

# Folders of the standard library that hold tests, vendored code or generated tables rather than
# documentation prose.
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3"}


def is_builtin(spec: str) -> bool:
    """True when an input path names an embedded corpus (``builtin:NAME``)."""
    return spec.startswith(BUILTIN_PREFIX)


def stdlib_files() -> list[Path]:
    """The standard library's ``.py`` files in a fixed (sorted) order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in _SKIP_DIRS for part in rel.parts[:-1]):
            continue
        files.append(path)
    return files


@functools.cache
def python_docs() -> tuple[tuple[str, str], ...]:
    """``(location, text)`` of each docstring and pydoc topic, in a fixed order.

    Parsing the standard library takes a few seconds, so the result (2 MB) is kept: prep reads
    the corpus twice (tokenizer sample, then tokenization).
    """
    return tuple(_python_docs())


def _python_docs() -> Iterator[tuple[str, str]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in stdlib_files():
        try:
            source = path.read_text(encoding="utf-8")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # invalid escape sequences in old modules
                tree = ast.parse(source, filename=str(path))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # a handful of stdlib files are templates, not Python 3 source
        nodes = [tree] + [
            n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        ]
        for node in nodes:
            doc = ast.get_docstring(node, clean=True)
            if doc and doc.strip():
                line = getattr(node, "lineno", 1)
                yield f"stdlib/{path.relative_to(root).as_posix()}:{line}", doc
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield f"pydoc_data/topics:{name}", topics[name]


def documents(spec: str) -> Iterator[tuple[str, str]]:
    """Documents of the embedded corpus that ``spec`` (``builtin:NAME``) names."""
    name = spec[len(BUILTIN_PREFIX) :]
    if name == "python-docs":
        return iter(python_docs())
    raise ValueError(f"unknown builtin corpus {spec!r} (known: {', '.join(CORPORA)})")


def describe() -> str:
    """Where the embedded corpus comes from, for manifests and the README."""
    return f"python-docs from CPython {sys.version.split()[0]} standard library and pydoc_data"

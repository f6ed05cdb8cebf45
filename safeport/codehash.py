"""Code versions for content-addressed keys: a hash of what the code does, not of how its file reads.

A fitted map or vector is keyed by (among its inputs) the code that computed it. Hashing
the module source text would re-key every artefact when only a comment, a docstring or an
import path changes (the stage folders moving under ``safeport.`` changed every import
line and, with it, every key). So a module is hashed as its syntax tree with docstrings
removed (comments never reach the tree) and its imports reduced to a sorted set of
``(module, name, alias)`` with the ``safeport.`` prefix dropped: reordering, regrouping
or re-prefixing imports keeps the hash; importing a name from another module changes it.
Any change to a statement, an expression, a default value or an annotation changes it.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
from collections.abc import Iterable
from functools import cache
from types import ModuleType

_PREFIX = "safeport."


def _module_name(name: str | None, level: int = 0) -> str:
    base = "." * level + (name or "")
    return base.removeprefix(_PREFIX)


class _Normalise(ast.NodeTransformer):
    """Drops docstrings and import statements; collects the imports it drops."""

    def __init__(self) -> None:
        self.imports: set[tuple[str, str, str]] = set()

    def visit_Import(self, node: ast.Import) -> None:
        for a in node.names:
            self.imports.add((_module_name(a.name), "", _module_name(a.asname or "")))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        module = _module_name(node.module, node.level)
        for a in node.names:
            self.imports.add((module, a.name, a.asname or ""))

    def _body(self, node: ast.AST) -> ast.AST:
        self.generic_visit(node)
        body = getattr(node, "body", None)
        if isinstance(body, list):
            first = body[0].value if body and isinstance(body[0], ast.Expr) else None
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                body = body[1:]
            node.body = body or [ast.Pass()]  # type: ignore[attr-defined]
        return node

    def visit_Module(self, node: ast.Module) -> ast.AST:
        return self._body(node)

    def visit_ClassDef(self, node: ast.ClassDef) -> ast.AST:
        return self._body(node)

    def visit_FunctionDef(self, node: ast.FunctionDef) -> ast.AST:
        return self._body(node)

    def visit_AsyncFunctionDef(self, node: ast.AsyncFunctionDef) -> ast.AST:
        return self._body(node)

    def generic_visit(self, node: ast.AST) -> ast.AST:
        super().generic_visit(node)
        if getattr(node, "body", None) == []:  # a block (if TYPE_CHECKING:, try:) left empty by dropped imports
            node.body = [ast.Pass()]  # type: ignore[attr-defined]
        return node


def source_digest(source: str) -> str:
    """sha256 of a module's normalised syntax tree (see the module docstring)."""
    norm = _Normalise()
    tree = norm.visit(ast.parse(source))
    h = hashlib.sha256(ast.dump(tree, annotate_fields=True, include_attributes=False).encode())
    h.update(repr(sorted(norm.imports)).encode())
    return h.hexdigest()


@cache
def _module_digest(module: ModuleType) -> str:
    return source_digest(inspect.getsource(module))


def code_hash(modules: Iterable[ModuleType | None]) -> str:
    """One short hash over several modules; their order and names do not matter, only what they do."""
    digests = sorted({_module_digest(m) for m in modules if m is not None})
    return hashlib.sha256("|".join(digests).encode()).hexdigest()[:12]

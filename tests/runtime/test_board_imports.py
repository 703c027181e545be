"""What runs on the board imports no host code: every module under runtime/ and, transitively, every
rksmolvlm module it imports (at the top, inside functions, under TYPE_CHECKING) is read as source, and
none may reach the converter, calibration, the host preview, the board tools, the runner factory that
chooses engines, torch, transformers, onnx, onnxruntime or rknn-toolkit2 (``rknn``; the board's
``rknnlite`` is allowed). A failure names the import chain."""

from __future__ import annotations

import ast
import importlib.util
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import pytest

FORBIDDEN_PACKAGES = ("rksmolvlm.convert", "rksmolvlm.calibration", "rksmolvlm.preview", "rksmolvlm.tools",
                      "rksmolvlm.runners")
FORBIDDEN_THIRD_PARTY = ("torch", "transformers", "onnx", "onnxruntime", "rknn")
# The installed namespace's roots (pyproject's package-dir maps them to different folders).
NAMESPACE_ROOTS = ("rksmolvlm", "rksmolvlm.runtime", "rksmolvlm.convert", "rksmolvlm.calibration",
                   "rksmolvlm.boards")


@dataclass(frozen=True)
class Import:
    module: str  # the module imported
    importer: str  # the module whose source imports it
    line: int


def test_nothing_under_runtime_reaches_host_code():
    roots = _roots()
    walked, violations = walk(_modules_under("rksmolvlm.runtime", roots["rksmolvlm.runtime"]), roots)
    assert not violations, "the board package reaches host code:\n" + "\n".join(violations)


def test_the_walk_reads_the_whole_board_package():
    roots = _roots()
    start = _modules_under("rksmolvlm.runtime", roots["rksmolvlm.runtime"])
    walked, _ = walk(start, roots)
    assert len(start) >= 15
    assert {"rksmolvlm.runtime.runner", "rksmolvlm.runtime.engines", "rksmolvlm.runtime.npu_engines",
            "rksmolvlm.runtime.server.service", "rksmolvlm.runtime.server.process"} <= set(start)
    # and what they import, transitively: the shared processing core, the bundle contract, the errors
    assert {"rksmolvlm.processing.assembler", "rksmolvlm.processing.image", "rksmolvlm.errors",
            "rksmolvlm.boards", "rksmolvlm"} <= walked


def test_the_walk_catches_planted_imports_with_their_chain(tmp_path):
    """A board module importing, inside a function, a helper that imports the host preview under
    TYPE_CHECKING; another importing torch, the runner factory and (by name) onnxruntime, and the
    board's rknnlite: each forbidden one named with its chain."""
    package = tmp_path / "plant"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "board.py").write_text("import numpy as np\n\n\ndef work():\n    from . import helper\n"
                                      "    return helper\n")
    (package / "helper.py").write_text("from typing import TYPE_CHECKING\n\nimport rksmolvlm.errors\n\n"
                                       "if TYPE_CHECKING:\n    from rksmolvlm.preview.host_engines import "
                                       "TorchLlmEngine\n")
    (package / "other.py").write_text("import json\n\n\nclass A:\n    def run(self):\n        import torch.nn\n"
                                      "        from rksmolvlm import runners\n        import rknnlite.api\n"
                                      "        import importlib\n        importlib.import_module('onnxruntime')\n")
    roots = {**_roots(), "plant": package}
    start = {name: path for name, path in _modules_under("plant", package).items() if name != "plant.helper"}
    walked, violations = walk(start, roots)  # the helper is found through the function-level import
    assert {"plant.board", "plant.helper", "plant.other", "rksmolvlm.errors"} <= walked
    assert sorted(violations) == sorted([
        "plant.board → plant.helper (line 5) → rksmolvlm.preview.host_engines (line 6)",
        "plant.other → torch.nn (line 6)",
        "plant.other → rksmolvlm.runners (line 7)",
        "plant.other → onnxruntime (line 10)",
    ])


# -- the walk --------------------------------------------------------------------------------------
def walk(start: dict[str, Path], roots: dict[str, Path]) -> tuple[set[str], list[str]]:
    """(every module read, one line per forbidden import: its chain from a start module)."""
    parents: dict[str, Import | None] = {name: None for name in start}
    files = dict(start)
    queue = deque(sorted(start))
    violations = []
    while queue:
        name = queue.popleft()
        for imported in _imports(name, files[name]):
            if _forbidden(imported.module):
                violations.append(_chain(parents, imported))
                continue
            for module in _with_parents(imported.module):
                path = _module_file(module, roots)
                if path is not None and module not in parents:
                    parents[module] = Import(module, name, imported.line)
                    files[module] = path
                    queue.append(module)
    return set(parents), violations


def _imports(name: str, path: Path) -> list[Import]:
    """Every import in the module's source, wherever it stands; ``from a import b`` counts as a.b too
    (b may be a submodule), and ``importlib.import_module("a")`` / ``__import__("a")`` as ``import a``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [Import(alias.name, name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            out.append(Import(base, name, node.lineno))
            if not _forbidden(base):  # else the one line says it
                out += [Import(f"{base}.{alias.name}", name, node.lineno) for alias in node.names
                        if alias.name != "*"]
        elif isinstance(node, ast.Call) and _dynamic_import(node):
            out.append(Import(node.args[0].value, name, node.lineno))
    return out


def _dynamic_import(call: ast.Call) -> bool:
    func = call.func
    called = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
    return (called in ("import_module", "__import__") and bool(call.args) and isinstance(call.args[0], ast.Constant)
            and isinstance(call.args[0].value, str))


def _forbidden(module: str) -> bool:
    if module.split(".")[0] in FORBIDDEN_THIRD_PARTY:
        return True
    return any(module == p or module.startswith(p + ".") for p in FORBIDDEN_PACKAGES)


def _chain(parents: dict[str, Import | None], last: Import) -> str:
    links = [f"{last.module} (line {last.line})"]
    module = last.importer
    while parents[module] is not None:
        link = parents[module]
        links.append(f"{module} (line {link.line})")
        module = link.importer
    return " → ".join([module, *reversed(links)])


def _with_parents(module: str) -> list[str]:
    """Importing a.b.c runs a, a.b and a.b.c."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _module_file(module: str, roots: dict[str, Path]) -> Path | None:
    """The source of ``module`` under the longest root that holds it; None for other packages and for
    names that are not modules (a class imported from one)."""
    parts = module.split(".")
    for i in range(len(parts), 0, -1):
        root = roots.get(".".join(parts[:i]))
        if root is None:
            continue
        path = root.joinpath(*parts[i:])
        for candidate in (path / "__init__.py", path.with_suffix(".py")) if parts[i:] else (path / "__init__.py",):
            if candidate.is_file():
                return candidate
        return None
    return None


def _modules_under(package: str, root: Path) -> dict[str, Path]:
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join([package, *parts])] = path
    return out


def _roots() -> dict[str, Path]:
    out = {}
    for name in NAMESPACE_ROOTS:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            pytest.fail(f"{name} is not installed as a package: reinstall the project (pip install -e .)")
        out[name] = Path(list(spec.submodule_search_locations)[0])
    return out

"""Each layer imports only the layers below it (DESIGN.md, "Layers").

ground (errors, identity, addresses, data-dir files, the command table) < wire < dht <
signaling < aio < face. Read from the source with :mod:`ast`, imports under
``TYPE_CHECKING`` included: a type-only import upward is still a dependency upward.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "dhtsignal"
GROUND = {"errors", "identity", "datadir", "wire.addr", "commands"}
ORDER = ["ground", "wire", "dht", "signaling", "aio", "face"]


def layer(module: str) -> str:
    """The layer of ``module`` (a dotted name below ``dhtsignal``)."""
    if module in GROUND or module == "":
        return "ground"
    top = module.split(".")[0]
    return top if top in ("wire", "dht", "signaling", "aio") else "face"


def modules() -> list[str]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).with_suffix("")
        parts = [p for p in rel.parts if p != "__init__"]
        out.append(".".join(parts))
    return out


def source_of(module: str) -> str:
    """The source text of ``module`` (a package's ``__init__``)."""
    base = PACKAGE.joinpath(*module.split(".")) if module else PACKAGE
    return (base / "__init__.py" if base.is_dir() else base.with_suffix(".py")).read_text()


def imports_of(module: str) -> set[str]:
    """The dhtsignal modules that ``module`` imports (as dotted names below the package)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source_of(module))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "dhtsignal":
                found.update(alias.name for alias in node.names)
            elif node.module.startswith("dhtsignal."):
                name = node.module.removeprefix("dhtsignal.")
                subs = {f"{name}.{a.name}" for a in node.names} & ALL
                found.update(subs or {name})
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("dhtsignal."):
                    found.add(alias.name.removeprefix("dhtsignal."))
    return {m for m in found if m in ALL or m.split(".")[0] in ALL}


ALL = set(modules())


@pytest.mark.parametrize("module", sorted(m for m in ALL if m))
def test_imports_only_layers_below_or_its_own(module: str) -> None:
    mine = ORDER.index(layer(module))
    for imported in imports_of(module):
        theirs = ORDER.index(layer(imported))
        assert theirs < mine or (theirs == mine and mine > 0) or imported in GROUND, (
            f"{module} ({layer(module)}) imports {imported} ({layer(imported)})"
        )


def test_the_dht_does_not_import_signaling_or_anything_with_io() -> None:
    for module in (m for m in ALL if layer(m) == "dht"):
        assert {layer(i) for i in imports_of(module)} <= {"ground", "wire", "dht"}, module


IO_MODULES = {"asyncio", "socket", "selectors", "time", "threading", "subprocess", "aiortc"}


def stdlib_imports_of(module: str) -> set[str]:
    """The top-level names of everything ``module`` imports that is not dhtsignal."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source_of(module))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
    return found - {"dhtsignal"}


@pytest.mark.parametrize("module", sorted(m for m in ALL if layer(m) in ("dht", "signaling")))
def test_protocol_layers_own_no_sockets_tasks_or_clocks(module: str) -> None:
    """The DHT and signaling logic takes ``now`` as an argument and returns what to send:
    it imports nothing that owns sockets, tasks or clocks."""
    assert not stdlib_imports_of(module) & IO_MODULES, module

"""The package's layers, read from the code (every import, lazy ones included).

- The product never imports :mod:`cloudllm_serve.devhost` (the one-machine tooling): a
  replica on a cluster runs none of it.
- The ingress reaches the engine only through its contract, ``engine/protocol.py``: what
  runs in the engine replica (vLLM, the simulated engine, the Serve shim, the router) can
  change without the ingress knowing.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "cloudllm_serve"
DEVHOST = "cloudllm_serve.devhost"
ENGINE = "cloudllm_serve.engine"
ENGINE_CONTRACT = "cloudllm_serve.engine.protocol"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(source: str, module: str, is_package: bool = False) -> set[str]:
    """Every module ``source`` (the module ``module``) imports, as absolute names; for
    ``from X import y``, both ``X`` and ``X.y`` (``y`` may be a module)."""
    names: set[str] = set()
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def imports_of(path: Path) -> set[str]:
    return imported(path.read_text(), module_name(path), path.name == "__init__.py")


def product_modules() -> list[Path]:
    return [p for p in sorted(PACKAGE.rglob("*.py")) if "devhost" not in p.parts]


def test_the_rules_see_every_kind_of_import() -> None:
    source = "def later():\n    from ..devhost import ports\nimport cloudllm_serve.engine.routing\n"
    found = imported(source, "cloudllm_serve.ingress.service")
    assert "cloudllm_serve.devhost.ports" in found
    assert "cloudllm_serve.engine.routing" in found
    assert len(product_modules()) > 50


def test_the_product_never_imports_the_dev_host_package() -> None:
    broken = {
        module_name(path): sorted(n for n in imports_of(path) if n.startswith(DEVHOST))
        for path in product_modules()
    }
    assert not {m: names for m, names in broken.items() if names}, (
        "cloudllm_serve/devhost/ is the one-machine tooling; replicas must not import it"
    )


def test_the_ingress_reaches_the_engine_only_through_its_protocol() -> None:
    ingress = [p for p in product_modules() if "ingress" in p.relative_to(PACKAGE).parts]
    assert ingress
    broken = {
        module_name(path): sorted(
            n
            for n in imports_of(path)
            if n.startswith(f"{ENGINE}.") and not n.startswith(ENGINE_CONTRACT)
        )
        for path in ingress
    }
    assert not {m: names for m, names in broken.items() if names}, (
        "the ingress may import only cloudllm_serve.engine.protocol of the engine package"
    )

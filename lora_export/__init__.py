"""lora-export: merge PEFT LoRA adapters into their base model, prove it, export it, benchmark it.

The names below are imported on first use (PEP 562), so `import lora_export` — and `lora-export --help` — does not
load torch or transformers.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

_EXPORTS = {
    "LoraAdapter": "adapters",
    "LoraModule": "adapters",
    "load_adapter": "adapters",
    "AdapterError": "errors",
    "InputError": "errors",
    "LoraExportError": "errors",
    "NonFiniteError": "errors",
    "OutputError": "errors",
    "ShapeMismatchError": "errors",
    "UnsupportedError": "errors",
    "VerifyError": "errors",
    "LoraLayer": "lora_runtime",
    "apply_lora": "lora_runtime",
    "load_unmerged": "lora_runtime",
    "MergeOptions": "merge",
    "MergeResult": "merge",
    "delta_weight": "delta",
    "merge": "merge",
    "TOLERANCES": "tolerances",
    "tolerance": "tolerances",
    "VerifyOptions": "verify",
    "VerifyReport": "verify",
    "verify": "verify",
}

__all__ = [
    "AdapterError",
    "InputError",
    "LoraAdapter",
    "LoraExportError",
    "LoraLayer",
    "LoraModule",
    "MergeOptions",
    "MergeResult",
    "NonFiniteError",
    "OutputError",
    "ShapeMismatchError",
    "TOLERANCES",
    "UnsupportedError",
    "VerifyError",
    "VerifyOptions",
    "VerifyReport",
    "__version__",
    "apply_lora",
    "delta_weight",
    "load_adapter",
    "load_unmerged",
    "merge",
    "tolerance",
    "verify",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lora_export' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


class _Package(types.ModuleType):
    """`lora_export.merge` and `lora_export.verify` are the functions, as they were when this file imported them
    eagerly: importing the submodule of the same name would otherwise replace the function by the module (use
    `importlib.import_module("lora_export.merge")` for the module)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == name:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


if TYPE_CHECKING:
    from .adapters import LoraAdapter, LoraModule, load_adapter
    from .delta import delta_weight
    from .errors import (
        AdapterError,
        InputError,
        LoraExportError,
        NonFiniteError,
        OutputError,
        ShapeMismatchError,
        UnsupportedError,
        VerifyError,
    )
    from .lora_runtime import LoraLayer, apply_lora, load_unmerged
    from .merge import MergeOptions, MergeResult, merge
    from .tolerances import TOLERANCES, tolerance
    from .verify import VerifyOptions, VerifyReport, verify

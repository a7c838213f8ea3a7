"""lora-export: merge PEFT LoRA adapters into their base model, prove it, export it, benchmark it.

The public API, re-exported lazily: each name below is imported on first use (PEP 562), so `import lora_export` — and
`lora-export --help` — loads no torch or transformers. The stages live in subpackages, imports running only downward
(pyproject.toml's import-linter contract states the order): io → records → model → merging → verification → render
→ exporting → package → bench → demo → cli. `merge`, `verify` and `export` are the public functions; their stages
are named merging/, verification/ and exporting/ so that no submodule shadows them (importing a submodule sets it
as an attribute of its package).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

_EXPORTS = {
    "LoraAdapter": "model.adapters",
    "LoraModule": "model.adapters",
    "load_adapter": "model.adapters",
    "AdapterError": "io.errors",
    "InputError": "io.errors",
    "LoraExportError": "io.errors",
    "NonFiniteError": "io.errors",
    "OutputError": "io.errors",
    "ShapeMismatchError": "io.errors",
    "UnsupportedError": "io.errors",
    "VerifyError": "io.errors",
    "LoraLayer": "verification.lora_runtime",
    "apply_lora": "verification.lora_runtime",
    "load_unmerged": "verification.lora_runtime",
    "MergeOptions": "merging.merge",
    "MergeResult": "merging.merge",
    "delta_weight": "merging.delta",
    "merge": "merging.merge",
    "TOLERANCES": "records.tolerances",
    "tolerance": "records.tolerances",
    "VerifyOptions": "verification.verify",
    "VerifyReport": "verification.verify",
    "verify": "verification.verify",
    "ExportOptions": "exporting.pipeline",
    "PipelineResult": "exporting.pipeline",
    "export": "exporting.pipeline",
    "merge_and_onnx": "exporting.pipeline",
}

__all__ = [
    "AdapterError",
    "ExportOptions",
    "InputError",
    "LoraAdapter",
    "LoraExportError",
    "LoraLayer",
    "LoraModule",
    "MergeOptions",
    "MergeResult",
    "NonFiniteError",
    "OutputError",
    "PipelineResult",
    "ShapeMismatchError",
    "TOLERANCES",
    "UnsupportedError",
    "VerifyError",
    "VerifyOptions",
    "VerifyReport",
    "__version__",
    "apply_lora",
    "delta_weight",
    "export",
    "load_adapter",
    "load_unmerged",
    "merge",
    "merge_and_onnx",
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


if TYPE_CHECKING:
    from .exporting.pipeline import ExportOptions, PipelineResult, export, merge_and_onnx
    from .io.errors import (
        AdapterError,
        InputError,
        LoraExportError,
        NonFiniteError,
        OutputError,
        ShapeMismatchError,
        UnsupportedError,
        VerifyError,
    )
    from .merging.delta import delta_weight
    from .merging.merge import MergeOptions, MergeResult, merge
    from .model.adapters import LoraAdapter, LoraModule, load_adapter
    from .records.tolerances import TOLERANCES, tolerance
    from .verification.lora_runtime import LoraLayer, apply_lora, load_unmerged
    from .verification.verify import VerifyOptions, VerifyReport, verify

"""lora-export: merge PEFT LoRA adapters into their base model, prove it, export it, benchmark it."""

__version__ = "0.1.0"

from .adapters import LoraAdapter, LoraModule, load_adapter  # noqa: E402
from .errors import (  # noqa: E402
    AdapterError,
    InputError,
    LoraExportError,
    NonFiniteError,
    OutputError,
    ShapeMismatchError,
    UnsupportedError,
    VerifyError,
)
from .lora_runtime import LoraLayer, apply_lora, load_unmerged  # noqa: E402
from .merge import MergeOptions, MergeResult, delta_weight, merge  # noqa: E402
from .verify import TOLERANCES, VerifyOptions, VerifyReport, verify  # noqa: E402

__all__ = [
    "AdapterError",
    "InputError",
    "LoraAdapter",
    "LoraLayer",
    "LoraExportError",
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
    "verify",
]

"""What inspect reports about an adapter."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class ModuleInspection:
    module: str
    kind: str
    variant: str
    r: int
    lora_alpha: float
    scaling: float
    params: int
    shape: tuple[int, int]
    spectrum: Mapping[str, float]
    base_shape: tuple[int, ...] | None = None


@dataclass(frozen=True)
class AdapterInspection:
    adapter: str
    peft_type: str
    r: int
    lora_alpha: float
    use_rslora: bool
    use_dora: bool
    modules: tuple[ModuleInspection, ...]
    replaced_tensors: tuple[str, ...]
    params: int
    weights_file: str
    weights_bytes: int
    sha256: str
    base: str | None
    compatible: bool | None  # None: no base given
    incompatibility: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

"""lora_export.json: what a merge read, wrote and changed, with hashes."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..io.errors import InputError
from ..io.jsonio import Fields, relative_name
from .source import HubSource
from .stored import StoredRecord

SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class FileRecord:
    name: str
    sha256: str
    size: int

    @classmethod
    def from_fields(cls, f: Fields) -> FileRecord:
        name = relative_name(f.get("name", str), f)
        sha = f.get("sha256", str)
        if not SHA256.fullmatch(sha):
            f.fail("sha256", "must be 64 lower-case hex digits")
        size = f.get("size", int)
        if size < 0:
            f.fail("size", f"must be ≥ 0, found {size}")
        return cls(name, sha, size)


def files_of(folder: Path) -> tuple[FileRecord, ...]:
    """Every regular file under `folder` (written by this process), with its sha256 and size (symlinks are not
    followed)."""
    from ..io.hashing import sha256_written

    return tuple(
        FileRecord(p.relative_to(folder).as_posix(), sha256_written(p), p.stat().st_size)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.is_symlink()
    )


def versions() -> dict[str, str]:
    """Versions of the libraries that shape an artifact, read from package metadata (nothing is imported)."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("lora-export", "torch", "transformers", "safetensors", "onnx", "onnxruntime", "onnxscript"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


MERGE_FIX = "was the folder written by lora-export merge? Merge again rather than editing the manifest"


@dataclass(frozen=True)
class AdapterRecord:
    path: str
    weight: float
    files: tuple[FileRecord, ...]
    config: Mapping[str, Any]
    source: HubSource | None = None  # where it came from on the Hub

    @property
    def sha256s(self) -> set[str]:
        return {f.sha256 for f in self.files}


@dataclass(frozen=True)
class MergeManifest(StoredRecord):
    tool: Mapping[str, Any]
    versions: Mapping[str, str]
    options: Mapping[str, Any]
    base_path: str
    base_weights: tuple[FileRecord, ...]
    base_files: tuple[FileRecord, ...]
    adapters: tuple[AdapterRecord, ...]
    dtype: str | tuple[str, ...]
    files: tuple[FileRecord, ...]
    untied: Mapping[str, str]
    tie_word_embeddings: bool | None
    notes: tuple[str, ...]
    tensors: Mapping[str, Mapping[str, Any]]
    seconds: float
    swap: Mapping[str, Any] | None = None
    base_source: HubSource | None = None  # where the base came from on the Hub

    NAME = "lora_export.json"
    FIX = MERGE_FIX
    MISSING = "only folders merged by lora-export record what was merged"

    @property
    def merged_tensors(self) -> int:
        return sum(1 for t in self.tensors.values() if t.get("adapters"))

    @property
    def single_dtype(self) -> str:
        if isinstance(self.dtype, str):
            return self.dtype
        return self.dtype[0] if len(self.dtype) == 1 else "auto"

    def to_dict(self) -> dict[str, Any]:
        out = {
            "tool": dict(self.tool),
            "versions": dict(self.versions),
            "options": dict(self.options),
            "base": {
                "path": self.base_path,
                "weights": [asdict(f) for f in self.base_weights],
                "files": [asdict(f) for f in self.base_files],
                **({"source": self.base_source.to_dict()} if self.base_source else {}),
            },
            "adapters": [
                {
                    "path": a.path,
                    "weight": a.weight,
                    "files": [asdict(f) for f in a.files],
                    "config": dict(a.config),
                    **({"source": a.source.to_dict()} if a.source else {}),
                }
                for a in self.adapters
            ],
            "output": {
                "dtype": self.dtype if isinstance(self.dtype, str) else list(self.dtype),
                "files": [asdict(f) for f in self.files],
                "untied": dict(self.untied),
                "tie_word_embeddings": self.tie_word_embeddings,
            },
            "notes": list(self.notes),
            "tensors": {k: dict(v) for k, v in self.tensors.items()},
            "seconds": self.seconds,
        }
        if self.swap is not None:
            out["swap"] = dict(self.swap)
        return out

    @classmethod
    def from_dict(cls, data: Any, path: Path) -> MergeManifest:
        f = Fields(data, path, fix=MERGE_FIX, label="damaged manifest")
        base, output = f.sub("base"), f.sub("output")
        assert base is not None and output is not None
        adapters = tuple(
            AdapterRecord(
                a.get("path", str),
                a.get("weight", float),
                tuple(FileRecord.from_fields(x) for x in a.items("files")),
                a.get("config", dict),
                recorded_source(a),
            )
            for a in f.items("adapters")
        )
        if not adapters:
            f.fail("adapters", "lists no adapter")
        dtype = output.get("dtype", (str, list))
        return cls(
            tool=f.get("tool", dict),
            versions=f.get("versions", dict, {}),
            options=f.get("options", dict, {}),
            base_path=base.get("path", str),
            base_weights=tuple(FileRecord.from_fields(x) for x in base.items("weights")),
            base_files=tuple(FileRecord.from_fields(x) for x in base.items("files", [])),
            adapters=adapters,
            dtype=dtype if isinstance(dtype, str) else output.strings("dtype"),
            files=tuple(FileRecord.from_fields(x) for x in output.items("files")),
            untied=output.get("untied", dict, {}),
            tie_word_embeddings=output.get("tie_word_embeddings", bool, None, optional=True),
            notes=f.strings("notes", []),
            tensors=f.get("tensors", dict, {}),
            seconds=f.get("seconds", float, 0.0),
            swap=f.get("swap", dict, None, optional=True),
            base_source=recorded_source(base),
        )


def recorded_source(f: Fields, key: str = "source") -> HubSource | None:
    """A recorded Hub source under `key`, checked; None when absent."""
    data = f.get(key, dict, None, optional=True)
    try:
        return None if data is None else HubSource.from_dict(data)
    except InputError as e:
        f.fail(key, str(e))

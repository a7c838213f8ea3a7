"""manifest.json of a package, and what `package --check` finds."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..io.jsonio import Fields, relative_name
from .checks import Check, CheckedReport
from .merge import FileRecord, recorded_source
from .source import HubSource
from .stored import StoredRecord

PACKAGE_FIX = "rebuild the package with lora-export package"
EXPORTERS = ("dynamo", "genai")  # what made a layout's graph, and so which runtime re-checks it


@dataclass(frozen=True)
class SharedLayout:
    graph: str
    dtype: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    lora_inputs: Mapping[str, Any]
    adapters: Mapping[str, str]  # variant → its .onnx_adapter file, relative to the package
    parameters: Mapping[str, Mapping[str, list[int]]]  # variant → adapter parameter → shape
    checks: tuple[Check, ...]
    notes: tuple[str, ...] = ()
    exporter: str = "dynamo"  # dynamo: our decoder contract, runs in ONNX Runtime; genai: the builder's, in GenAI


@dataclass(frozen=True)
class MergedVariant:
    folder: str
    dtype: str
    graph: str  # the ONNX model to run, relative to the package
    checks: tuple[Check, ...]
    exporter: str = "dynamo"
    reused_graph: str = ""  # when the graph is another variant's, with this variant's weights: whose, and what


@dataclass(frozen=True)
class PackagePart:
    """What a part (`package --only NAME`) is a part of: the package's variants, in order, and the one it holds."""

    variants: tuple[str, ...]
    only: str

    def to_dict(self) -> dict[str, Any]:
        return {"variants": list(self.variants), "only": self.only}


@dataclass(frozen=True)
class PackageManifest(CheckedReport, StoredRecord):
    base: str
    mode: str
    versions: Mapping[str, str]
    tolerances: Mapping[str, Any]
    variants: Mapping[str, Mapping[str, Any]]
    shared: SharedLayout | None
    merged: Mapping[str, MergedVariant]
    merged_sharing: Mapping[str, Any] | None
    storage: Mapping[str, Any]
    files: tuple[FileRecord, ...]
    seconds: float
    base_source: HubSource | None = None  # where the base came from on the Hub
    part: PackagePart | None = None  # `package --only NAME`: one variant's part, for `package --assemble`

    NAME = "manifest.json"
    FIX = PACKAGE_FIX
    MISSING = f"is it a lora-export package? {PACKAGE_FIX}"

    @property
    def checks(self) -> tuple[Check, ...]:  # type: ignore[override]
        return (*(self.shared.checks if self.shared else ()), *(c for v in self.merged.values() for c in v.checks))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "tool": "lora-export package",
            "base": self.base,
            **({"base_source": self.base_source.to_dict()} if self.base_source else {}),
            "mode": self.mode,
            "passed": self.passed,
            "versions": dict(self.versions),
            "tolerances": dict(self.tolerances),
            "variants": {k: dict(v) for k, v in self.variants.items()},
            **({"part": self.part.to_dict()} if self.part else {}),
        }
        if self.shared is not None:
            s = self.shared
            out["shared"] = {
                **{k: getattr(s, k) for k in ("graph", "dtype", "exporter")},
                "inputs": list(s.inputs),
                "outputs": list(s.outputs),
                "lora_inputs": dict(s.lora_inputs),
                "adapters": {
                    n: {"file": f.removeprefix("shared/"), "parameters": dict(s.parameters.get(n, {}))}
                    for n, f in s.adapters.items()
                },
                "checks": [c.to_dict() for c in s.checks],
                "notes": list(s.notes),
            }
        if self.merged:
            out["merged"] = {
                n: {
                    **{k: getattr(v, k) for k in ("folder", "dtype", "graph", "exporter", "reused_graph")},
                    "checks": [c.to_dict() for c in v.checks],
                }
                for n, v in self.merged.items()
            }
        if self.merged_sharing is not None:
            out["merged_sharing"] = dict(self.merged_sharing)
        out.update(storage=dict(self.storage), files=[asdict(f) for f in self.files], seconds=self.seconds)
        return out

    @classmethod
    def from_dict(cls, data: Any, path: Path) -> PackageManifest:
        f = Fields(data, path, fix=PACKAGE_FIX, label="damaged manifest")
        files = tuple(FileRecord.from_fields(x) for x in f.items("files"))  # first: what may be opened at all
        if not files:
            f.fail("files", "lists no file: nothing could be checked")
        shared = None
        if (s := f.sub("shared", None)) is not None:
            adapters = {name: s.child(a, f"shared.adapters.{name}") for name, a in s.get("adapters", dict).items()}
            shared = SharedLayout(
                graph=relative_name(s.get("graph", str), s),
                dtype=s.get("dtype", str),
                inputs=s.strings("inputs"),
                outputs=s.strings("outputs"),
                lora_inputs=s.get("lora_inputs", dict, {}),
                adapters={n: "shared/" + relative_name(a.get("file", str), a) for n, a in adapters.items()},
                parameters={n: a.get("parameters", dict, {}) for n, a in adapters.items()},
                checks=tuple(Check.from_fields(c) for c in s.items("checks")),
                notes=s.strings("notes", []),
                exporter=s.choice("exporter", EXPORTERS, "dynamo"),
            )
        merged = {}
        for name, v in f.get("merged", dict, {}).items():
            m = f.child(v, f"merged.{name}")
            folder = relative_name(m.get("folder", str), m)
            graph = relative_name(m.get("graph", str, f"{folder}/model.onnx"), m)
            checks = tuple(Check.from_fields(c) for c in m.items("checks"))
            exporter = m.choice("exporter", EXPORTERS, "dynamo")
            reused = m.get("reused_graph", str, "")
            merged[name] = MergedVariant(folder, m.get("dtype", str), graph, checks, exporter, reused)
        if shared is None and not merged:
            f.fail("shared", "is missing, and so is `merged`: the package has no layout")
        listed = {x.name for x in files}
        needed = [shared.graph, "shared/reference.npz", *shared.adapters.values()] if shared else []
        needed += [n for v in merged.values() for n in (f"{v.folder}/reference.npz", v.graph)]
        for name in needed:
            if name not in listed:
                f.fail("files", f"does not list {name}, which the checks need")
        manifest = cls(
            base=f.get("base", str),
            mode=f.get("mode", str),
            versions=f.get("versions", dict, {}),
            tolerances=f.get("tolerances", dict, {}),
            variants=f.get("variants", dict),
            shared=shared,
            merged=merged,
            merged_sharing=f.get("merged_sharing", dict, None, optional=True),
            storage=f.get("storage", dict, {}),
            files=files,
            seconds=f.get("seconds", float, 0.0),
            base_source=recorded_source(f, "base_source"),
            part=_part(f),
        )
        return manifest


def _part(f: Fields) -> PackagePart | None:
    p = f.sub("part", None)
    if p is None:
        return None
    part = PackagePart(p.strings("variants"), p.get("only", str))
    if part.only not in part.variants or len(set(part.variants)) != len(part.variants):
        f.fail("part", f"names {part.only!r} among {list(part.variants)}: each variant once, the part's among them")
    return part


@dataclass(frozen=True)
class PackageCheck(CheckedReport):
    """`package --check`: the files (sha256 and size, as one check) and then each reference run in ONNX Runtime."""

    package: str
    files_hashed: int
    checks: tuple[Check, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "package": self.package,
            "passed": self.passed,
            "files_hashed": self.files_hashed,
            "checks": [c.to_dict() for c in self.checks],
        }

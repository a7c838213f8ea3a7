"""The sections of the reports, typed: what verify found (generation, diagnosis, counted structure) and what the export
stage made. Each has `to_dict()` (the JSON the reports have always had) and `from_fields()`, the validating loader."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from ..io.jsonio import Fields


def _ints(f: Fields, key: str) -> tuple[int, ...]:
    values = f.get(key, list)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        f.fail(key, "must be a list of token ids (integers)")
    return tuple(values)


@dataclass(frozen=True)
class TokenComparison:
    """Greedy tokens against the reference's: the first position where they differ (None: identical)."""

    identical: bool
    first_difference: int | None
    reference: tuple[int, ...]
    tokens: tuple[int, ...]

    @classmethod
    def of(cls, reference: list[int], tokens: list[int]) -> TokenComparison:
        first = next((i for i, (a, b) in enumerate(zip(reference, tokens)) if a != b), None)
        if first is None and len(reference) != len(tokens):
            first = min(len(reference), len(tokens))
        return cls(first is None, first, tuple(reference), tuple(tokens))

    def to_dict(self) -> dict[str, Any]:
        return {
            "identical": self.identical,
            "first_difference": self.first_difference,
            "reference": list(self.reference),
            "tokens": list(self.tokens),
        }

    @classmethod
    def from_fields(cls, f: Fields) -> TokenComparison:
        first = f.get("first_difference", int, None, optional=True)
        return cls(f.get("identical", bool), first, _ints(f, "reference"), _ints(f, "tokens"))


@dataclass(frozen=True)
class Generation:
    """verify's greedy generation: merged float32 vs unmerged float32 (a check) and, for a half-precision merged
    folder, merged in that dtype vs unmerged float32 (reported: a half dtype may pick another token after a while)."""

    prompt_tokens: tuple[int, ...]
    max_new_tokens: int
    float32: TokenComparison
    prompt: str | None = None
    unmerged_text: str | None = None
    half: tuple[str, TokenComparison] | None = None  # (the merged folder's dtype, its tokens)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "prompt_tokens": list(self.prompt_tokens),
            "max_new_tokens": self.max_new_tokens,
            "float32": self.float32.to_dict(),
        }
        if self.prompt is not None:
            out.update(prompt=self.prompt, unmerged_text=self.unmerged_text)
        if self.half is not None:
            out[self.half[0]] = self.half[1].to_dict()
        return out

    @classmethod
    def from_fields(cls, f: Fields) -> Generation:
        half = next((k for k in ("float16", "bfloat16") if k in f.data), None)
        return cls(
            prompt_tokens=_ints(f, "prompt_tokens"),
            max_new_tokens=f.get("max_new_tokens", int),
            float32=TokenComparison.from_fields(f.sub("float32")),  # type: ignore[arg-type]
            prompt=f.get("prompt", str, None, optional=True),
            unmerged_text=f.get("unmerged_text", str, None, optional=True),
            half=(half, TokenComparison.from_fields(f.sub(half))) if half else None,  # type: ignore[arg-type]
        )


@dataclass(frozen=True)
class Divergence:
    """A module whose output differs beyond tolerance, and by how much (relative to its largest output)."""

    module: str
    layer: str
    rel_error: float


@dataclass(frozen=True)
class Diagnosis:
    """When a check failed: the first module whose output diverges on the first failing case, the modules that differ
    most, and the merged tensors furthest from W0 + ΔW."""

    case: str
    tolerance: float
    first_divergence: Divergence | None
    worst_modules: tuple[tuple[str, float], ...]
    compares: str
    worst_tensors: tuple[Mapping[str, Any], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        first = self.first_divergence
        return {
            "case": self.case,
            "tolerance": self.tolerance,
            "first_divergence": None if first is None else vars(first).copy(),
            "worst_modules": [{"module": m, "rel_error": r} for m, r in self.worst_modules],
            "compares": self.compares,
            "worst_tensors": [dict(t) for t in self.worst_tensors],
        }

    @classmethod
    def from_fields(cls, f: Fields) -> Diagnosis:
        found = f.get("first_divergence", dict, None, optional=True)
        first = None if found is None else f.child(found, "first_divergence")
        return cls(
            case=f.get("case", str),
            tolerance=f.get("tolerance", float),
            first_divergence=None
            if first is None
            else Divergence(
                first.get("module", str), first.get("layer", str), first.get("rel_error", float, finite=False)
            ),
            worst_modules=tuple(
                (m.get("module", str), m.get("rel_error", float, finite=False)) for m in f.items("worst_modules")
            ),
            compares=f.get("compares", str),
            worst_tensors=tuple(f.get("worst_tensors", list, [])),
        )


@dataclass(frozen=True)
class Counted:
    """A forward pass counted exactly (or what one adds to another): FLOPs, operator calls, parameter bytes, and
    the calls per operator where they are listed."""

    flops: int
    op_calls: int
    param_bytes: int
    ops: Mapping[str, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        ops = {} if self.ops is None else {"ops": dict(self.ops)}
        return {"flops": self.flops, "op_calls": self.op_calls, **ops, "param_bytes": self.param_bytes}

    @classmethod
    def from_fields(cls, f: Fields) -> Counted:
        ops = f.get("ops", dict, None, optional=True)
        return cls(f.get("flops", int), f.get("op_calls", int), f.get("param_bytes", int), ops)


@dataclass(frozen=True)
class StructureSummary:
    """Counted per forward on one case: the merged model, and what LoRA applied unmerged would add to it."""

    case: str
    merged: Counted
    unmerged_adds: Counted

    def to_dict(self) -> dict[str, Any]:
        return {"case": self.case, "merged": self.merged.to_dict(), "unmerged_adds": self.unmerged_adds.to_dict()}

    @classmethod
    def from_fields(cls, f: Fields) -> StructureSummary:
        merged, adds = f.sub("merged"), f.sub("unmerged_adds")
        return cls(f.get("case", str), Counted.from_fields(merged), Counted.from_fields(adds))  # type: ignore[arg-type]


@dataclass(frozen=True)
class ExportSection:
    """What the export stage made: the artifact, by which exporter and why, and what was written beside it. Fields an
    exporter does not set stay None and are left out of the JSON."""

    format: str  # onnx, torchscript, pt2
    dtype: str
    exporter_choice: str | None = None  # onnx: why this exporter (auto's reason, or "asked for")
    rejected: tuple[str, ...] | None = None  # auto: the exporter whose output failed here first, and how
    exporter: str | None = None
    seconds: float | None = None
    path: str | None = None  # dynamo: the graph's path when it was exported
    file: str | None = None  # torchscript / pt2: the one artifact file
    files: tuple[str, ...] | None = None  # onnx: model.onnx and its external data
    kind: str | None = None  # causal-lm, sequence-classification, encoder
    with_past: bool | None = None
    input_names: tuple[str, ...] | None = None
    output_names: tuple[str, ...] | None = None
    opset: int | None = None  # the dynamo graph's
    optimized: bool | None = None
    external_data: bool | None = None
    precision: str | None = None  # the GenAI builder's graphs: fp32, fp16
    target: str | None = None  # cpu, cuda
    checked_on: str | None = None
    past_present_share_buffer: bool | None = None
    reused_graph: str | None = None  # a package's later variant: the template graph with this model's weights
    notes: tuple[str, ...] | None = None
    runtime_files: tuple[str, ...] | None = None  # what was written for the runtimes (genai_config.json, tokenizer)
    generation_text: Mapping[str, str] | None = None  # the dynamo check's greedy text in PyTorch and ONNX Runtime
    quantization: Mapping[str, Any] | None = (
        None  # int8/int4: the builder's options, size on disk and its ratio to fp32
    )
    quality: Mapping[str, Any] | None = None  # int8/int4: against the truth on the evaluation text
    adapter_effect: Mapping[str, Any] | None = None  # int8/int4: the adapters' effect, deployed vs float32

    @property
    def by_builder(self) -> bool:
        """The GenAI model builder's graph (checked in GenAI), not the dynamo exporter's."""
        return self.precision is not None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, Mapping):
                value = dict(value)
            if value is not None:
                out[f.name] = value
        return out

    @classmethod
    def from_fields(cls, f: Fields) -> ExportSection:
        unknown = sorted(set(f.data) - {x.name for x in fields(cls)})
        if unknown:
            f.fail(unknown[0], "is not a field of an export section")
        values: dict[str, Any] = {"format": f.get("format", str), "dtype": f.get("dtype", str)}
        for name in f.data:
            if name in _TEXT:
                values[name] = f.get(name, str)
            elif name in _FLAGS:
                values[name] = f.get(name, bool)
            elif name in _LISTS:
                values[name] = f.strings(name)
        values["seconds"] = f.get("seconds", float, None, optional=True)
        values["opset"] = f.get("opset", int, None, optional=True)
        text = f.get("generation_text", dict, None, optional=True)
        if text is not None and not all(isinstance(v, str) for v in text.values()):
            f.fail("generation_text", "must map runtimes to the text they generated")
        measured = {
            name: f.get(name, dict, None, optional=True) for name in ("quantization", "quality", "adapter_effect")
        }
        return cls(**values, generation_text=text, **measured)


_TEXT = {"exporter_choice", "exporter", "path", "file", "kind", "precision", "target", "checked_on", "reused_graph"}
_FLAGS = {"with_past", "optimized", "external_data", "past_present_share_buffer"}
_LISTS = {"files", "input_names", "output_names", "notes", "runtime_files", "rejected"}


@dataclass(frozen=True)
class MergeSection:
    """merge-and-onnx's merge stage: where the merged folder is and what it holds (the full record is its manifest)."""

    output: str
    dtype: str | tuple[str, ...]
    merged_tensors: int
    untied: Mapping[str, str]
    notes: tuple[str, ...]
    manifest: str

    def to_dict(self) -> dict[str, Any]:
        dtype = self.dtype if isinstance(self.dtype, str) else list(self.dtype)
        return {
            "output": self.output,
            "dtype": dtype,
            "merged_tensors": self.merged_tensors,
            "untied": dict(self.untied),
            "notes": list(self.notes),
            "manifest": self.manifest,
        }

    @classmethod
    def from_fields(cls, f: Fields) -> MergeSection:
        dtype = f.get("dtype", (str, list))
        return cls(
            output=f.get("output", str),
            dtype=dtype if isinstance(dtype, str) else f.strings("dtype"),
            merged_tensors=f.get("merged_tensors", int),
            untied=f.get("untied", dict, {}),
            notes=f.strings("notes", []),
            manifest=f.get("manifest", str),
        )


@dataclass(frozen=True)
class VerifySection:
    """merge-and-onnx's verify stage: the model, the tolerances and input cases used, and what verify found."""

    model_class: str
    merged_dtype: str
    tolerances: Mapping[str, Mapping[str, float]]
    cases: tuple[Mapping[str, Any], ...]
    generation: Generation | None = None
    diagnosis: Diagnosis | None = None
    structure: StructureSummary | None = None

    def to_dict(self) -> dict[str, Any]:
        typed = {"generation": self.generation, "diagnosis": self.diagnosis, "structure": self.structure}
        return {
            "model_class": self.model_class,
            "merged_dtype": self.merged_dtype,
            "tolerances": {k: dict(v) for k, v in self.tolerances.items()},
            "cases": [dict(c) for c in self.cases],
            **{k: None if v is None else v.to_dict() for k, v in typed.items()},
        }

    @classmethod
    def from_fields(cls, f: Fields) -> VerifySection:
        def typed(key: str, record: Any) -> Any:
            data = f.get(key, dict, None, optional=True)
            return None if data is None else record.from_fields(f.child(data, key))

        return cls(
            model_class=f.get("model_class", str),
            merged_dtype=f.get("merged_dtype", str),
            tolerances=f.get("tolerances", dict),
            cases=tuple(f.get("cases", list)),
            generation=typed("generation", Generation),
            diagnosis=typed("diagnosis", Diagnosis),
            structure=typed("structure", StructureSummary),
        )

"""Fold LoRA deltas into the base weights: W = W0 + Σ wᵢ·ΔWᵢ, in fp32, cast once, streamed in row chunks.

The math of each variant is in `delta_weight` and `lora_factors`; the rest plans which tensor gets which delta,
streams the base through, and records what was done and what the cast to the output dtype lost.
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .adapters import LoraAdapter, LoraModule, load_adapter
from .basemodel import WEIGHT_FILES, BaseModel
from .errors import LoraExportError, NonFiniteError, OutputError, ShapeMismatchError, UnsupportedError
from .tensors import (
    CHUNK_BYTES,
    FileHasher,
    OrderedWorker,
    SafetensorsStreamWriter,
    TensorSpec,
    WrittenFile,
    atomic_output_dir,
    check_free_space,
    check_output_location,
    dtype_name,
    plan_shards,
    reread_shard,
    BackgroundChecks,
    shard_file_names,
    write_index,
    write_json,
)

OUTPUT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
MANIFEST = "lora_export.json"


@dataclass(frozen=True)
class MergeOptions:
    """Everything that changes what `merge` writes. The CLI and the API share it; it is written beside the output."""

    dtype: str = "auto"  # auto keeps each tensor's stored dtype; or float32 / float16 / bfloat16
    weights: tuple[float, ...] = ()  # one per adapter; empty means 1.0 each
    max_shard_size: int = 5 * 1024**3
    allow_pickle: bool = False
    overwrite: bool = False
    progress: bool = True
    rehash_output: bool = False  # hash every written shard again from disk (slow; mostly reads the page cache back)


@dataclass(frozen=True)
class MergeResult:
    output: Path
    manifest: dict[str, Any]

    @property
    def merged_tensors(self) -> int:
        return sum(1 for t in self.manifest["tensors"].values() if t.get("adapters"))

    @property
    def untied(self) -> list[str]:
        return list(self.manifest["output"]["untied"])


# ---------------------------------------------------------------------------------------------------------------------
# The math


def delta_weight(module: LoraModule, base_weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    """ΔW of one module in the base tensor's stored layout, fp32. DoRA's ΔW is its merged weight minus W0.

    Linear: ΔW = s·B@A (out×in). Conv1D (fan_in_fan_out) and embeddings store (in×out) / (vocab×dim): ΔW = (s·B@A)ᵀ.
    DoRA: V = W0 + ΔW; n = ‖V‖ per output feature; W = (m / n)·V. For embeddings the norm runs over the vocabulary.
    """
    w0 = base_weight.float()
    delta = module.scaling * (module.lora_B.float() @ module.lora_A.float())
    if transposed:
        delta = delta.T
    if module.magnitude is None:
        return delta
    scale = dora_scale(module, w0, transposed, delta)
    return (w0 + delta) * (scale if transposed else scale.unsqueeze(1)) - w0


def dora_scale(module: LoraModule, w0: torch.Tensor, transposed: bool, delta: torch.Tensor | None = None) -> torch.Tensor:
    """DoRA's m / ‖W0 + ΔW‖, one per output feature, fp32. Transposed layouts ((in, out), (vocab, dim)) take the
    norm over their rows."""
    if delta is None:
        delta = module.scaling * (module.lora_B.float() @ module.lora_A.float())
        delta = delta.T if transposed else delta
    return module.magnitude.float() / torch.linalg.vector_norm(w0.float() + delta, dim=0 if transposed else 1)


def lora_factors(module: LoraModule, weight: float, transposed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, R) in fp32 with L @ R = weight·ΔW in the stored layout; rows of L follow rows of the base tensor.

    Concatenating the L's and R's of several adapters along r gives their exact weighted sum in one matmul.
    """
    a, b = module.lora_A.float(), module.lora_B.float() * (weight * module.scaling)
    return (a.T.contiguous(), b.T.contiguous()) if transposed else (b, a)


def factors_norm(left: torch.Tensor, right: torch.Tensor) -> float:
    """‖L@R‖_F without forming L@R: trace((LᵀL)(RRᵀ)), in float64."""
    ll, rr = left.double().T @ left.double(), right.double() @ right.double().T
    return math.sqrt(max(float((ll * rr).sum()), 0.0))


# ---------------------------------------------------------------------------------------------------------------------
# Planning: which tensor gets which delta


@dataclass
class Contribution:
    adapter: int
    module: LoraModule
    weight: float
    transposed: bool


@dataclass
class TensorPlan:
    name: str  # output name
    source: str  # stored base tensor it starts from (differs for untied copies of tied weights)
    out_dtype: torch.dtype
    shape: tuple[int, ...]
    deltas: list[Contribution] = field(default_factory=list)
    bias_deltas: list[Contribution] = field(default_factory=list)
    replacement: tuple[int, torch.Tensor] | None = None  # (adapter index, tensor) that replaces W0

    @property
    def touched(self) -> bool:
        return bool(self.deltas or self.bias_deltas or self.replacement)


def resolve_dtype(option: str, stored: torch.dtype) -> torch.dtype:
    if option == "auto" or not stored.is_floating_point:
        return stored
    if option not in OUTPUT_DTYPES:
        raise LoraExportError(f"--dtype {option!r}: choose auto, {', '.join(OUTPUT_DTYPES)}")
    return OUTPUT_DTYPES[option]


def plan_merge(base: BaseModel, adapters: Sequence[LoraAdapter], weights: Sequence[float], dtype: str) -> tuple[list[TensorPlan], dict[str, str], list[str]]:
    """Return (plans in output order, untied {output: source}, notes). Raises on anything that does not fit."""
    store, notes = base.store, []
    aliases = base.tied_aliases() if needs_tie_check(base, adapters) else {}
    plans = {info.name: TensorPlan(info.name, info.name, resolve_dtype(dtype, info.dtype), info.shape) for info in store.ordered()}
    for dst, src in aliases.items():
        info = store.infos[src]
        plans[dst] = TensorPlan(dst, src, resolve_dtype(dtype, info.dtype), info.shape)

    for i, (adapter, w) in enumerate(zip(adapters, weights)):
        for path, module in adapter.modules.items():
            plan = _target(plans, f"{path}.weight", adapter, path)
            transposed = module_layout(base, module, plan.shape, adapter)
            plan.deltas.append(Contribution(i, module, w, transposed))
            if module.lora_bias is not None:
                bias = _target(plans, f"{path}.bias", adapter, path, "lora_bias is true, but the base layer has no bias")
                bias.bias_deltas.append(Contribution(i, module, w, transposed))
        for name, tensor in adapter.replacements.items():
            plan = _target(plans, name, adapter, name.rsplit(".", 1)[0])
            if tuple(tensor.shape) != plan.shape:
                raise ShapeMismatchError(
                    f"{adapter.weights_file}: {name} has shape {'×'.join(map(str, tensor.shape))} but the base has "
                    f"{'×'.join(map(str, plan.shape))}: a resized vocabulary or another base model? Resizing is not supported"
                )
            if plan.replacement is not None:
                if not torch.equal(plan.replacement[1], tensor):
                    raise UnsupportedError(
                        f"{name} is replaced by both {adapters[plan.replacement[0]].path} and {adapter.path} "
                        "(modules_to_save or trained bias) with different values: merge these adapters separately"
                    )
                continue
            if w != 1.0 and not torch.equal(tensor, store.read(plan.source).to(tensor.dtype)):
                raise UnsupportedError(
                    f"{adapter.path} replaces {name} (modules_to_save or trained bias) and has weight {w}: a weighted "
                    "full replacement is not defined; use weight 1.0 for this adapter"
                )
            plan.replacement = (i, tensor)

    untied = {dst: src for dst, src in aliases.items() if plans[dst].touched or plans[src].touched}
    for dst in set(aliases) - set(untied):
        del plans[dst]
    for dst, src in untied.items():
        notes.append(f"{dst} was tied to {src}; the merge changes one of them, so the output stores both and sets tie_word_embeddings=false")
    return list(plans.values()), untied, notes


def _target(plans: dict[str, TensorPlan], name: str, adapter: LoraAdapter, module: str, why: str = "") -> TensorPlan:
    if name not in plans:
        raise ShapeMismatchError(
            f"{adapter.weights_file}: adapter targets {module}, but the base has no tensor {name}"
            f"{': ' + why if why else ''}: is this adapter for another base model?"
        )
    return plans[name]


def needs_tie_check(base: BaseModel, adapters: Sequence[LoraAdapter]) -> bool:
    """Building the model on the meta device costs seconds: only when a tied embedding may be touched."""
    if not base.tie_word_embeddings:
        return False
    vocab = base.text_config().get("vocab_size")
    for adapter in adapters:
        for path, module in adapter.modules.items():
            if module.kind == "embedding" or f"{path}.weight" not in base.store or module.lora_B.shape[0] == vocab:
                return True
        for name, tensor in adapter.replacements.items():
            if name not in base.store or (tensor.dim() == 2 and tensor.shape[0] == vocab):
                return True
    return False


def module_layout(base: BaseModel, module: LoraModule, shape: tuple[int, ...], adapter: LoraAdapter) -> bool:
    """True when the base stores this weight transposed (in×out): Conv1D (fan_in_fan_out) and embeddings."""
    out_f, in_f = module.lora_B.shape[0], module.lora_A.shape[1]
    where = f"{adapter.weights_file}: adapter targets {module.path}"
    if module.kind == "embedding":
        if shape != (in_f, out_f):
            raise ShapeMismatchError(f"{where} (embedding {in_f}×{out_f}) but the base has {'×'.join(map(str, shape))}: is this adapter for another base model?")
        return True
    if shape not in ((out_f, in_f), (in_f, out_f)):
        raise ShapeMismatchError(f"{where} (shape {out_f}×{in_f}) but the base has {'×'.join(map(str, shape))}: is this adapter for another base model?")
    if out_f != in_f:
        return shape == (in_f, out_f)
    conv1d = base.is_conv1d(module.path)
    if conv1d is None:  # unknown architecture and a square weight: only the config can tell
        return bool(adapter.config.get("fan_in_fan_out"))
    return conv1d  # PEFT forces fan_in_fan_out from the module class, whatever the config says


# ---------------------------------------------------------------------------------------------------------------------
# Streaming


class MergeStream:
    """Reads each planned tensor in row chunks, merges, casts, hands bytes to the writer; records statistics."""

    def __init__(self, base: BaseModel, plans: list[TensorPlan], out: Path, max_shard_size: int, progress: bool, rehash: bool = False):
        self.base, self.plans, self.out, self.rehash = base, plans, out, rehash
        self.specs = [TensorSpec(p.name, p.out_dtype, p.shape) for p in plans]
        self.shards = plan_shards(self.specs, max_shard_size)
        self.shard_names = shard_file_names(len(self.shards))
        self.hashers = {path: FileHasher(path) for path in base.weight_files}
        self.stats: dict[str, dict[str, Any]] = {}
        self.checks = BackgroundChecks()
        total = sum(s.nbytes for s in self.specs)
        self.bar = _progress(total, progress)

    def run(self) -> list[WrittenFile]:
        writer_q, hash_q = OrderedWorker("writer"), OrderedWorker("hasher")
        written: list[WrittenFile] = []
        plan_by_name = {p.name: p for p in self.plans}

        def finish(writer: SafetensorsStreamWriter, shard: list[TensorSpec]) -> None:
            written.append(writer.close())
            self.checks.start(reread_shard, writer.path, shard, written[-1], self.rehash)

        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # one core computes; the other writes and hashes (oversubscribing 2 cores is slower)
        try:
            for shard, fname in zip(self.shards, self.shard_names):
                writer = SafetensorsStreamWriter(self.out / fname, shard)
                for spec in shard:
                    self._tensor(plan_by_name[spec.name], writer, writer_q, hash_q)
                writer_q.submit(finish, writer, shard)
        finally:
            torch.set_num_threads(threads)
            try:
                writer_q.close()
                hash_q.close()
            finally:
                self.base.store.close()
                self.bar.close()
        return written

    def input_hashes(self) -> dict[str, str]:
        return {path.name: h.hexdigest() for path, h in self.hashers.items()}

    def _tensor(self, plan: TensorPlan, writer: SafetensorsStreamWriter, writer_q: OrderedWorker, hash_q: OrderedWorker) -> None:
        store = self.base.store
        info = store.infos[plan.source]
        own = plan.source == plan.name  # untied copies re-read their source; it is hashed once, in its own turn
        hasher = self.hashers.get(info.file) if own and not store.is_loaded(plan.source) else None
        rows = info.shape[0] if info.shape else 1
        row_fp32 = max(1, (info.row_bytes or 1) * 4 // max(1, info.dtype.itemsize))
        step = max(1, CHUNK_BYTES // row_fp32)
        if any(c.module.magnitude is not None for c in plan.deltas):
            self._dora_tensor(plan, info, hasher, writer, writer_q, hash_q)
            return
        merger = ChunkMerger(plan)
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            raw = store.read_rows(plan.source, r0, r1)
            if hasher is not None:
                hash_q.submit(hasher.feed, info.start + r0 * info.row_bytes, raw.reshape(-1).view(torch.uint8))
            out = merger.chunk(raw, r0, r1)
            writer_q.submit(writer.write, out)
            self.bar.update(out.numel() * out.element_size())
        if plan.touched or plan.out_dtype != info.dtype:
            self.stats[plan.name] = merger.summary()

    def _dora_tensor(self, plan: TensorPlan, info: Any, hasher: FileHasher | None, writer: SafetensorsStreamWriter, writer_q: OrderedWorker, hash_q: OrderedWorker) -> None:
        """DoRA normalises whole rows or columns: this one tensor is merged in one piece."""
        raw = self.base.store.read(plan.source)
        if hasher is not None:
            hash_q.submit(hasher.feed, info.start, raw.reshape(-1).view(torch.uint8))
        w0 = (plan.replacement[1] if plan.replacement else raw).float()
        merged = w0.clone()
        norms = []
        for c in plan.deltas:
            d = c.weight * delta_weight(c.module, w0, c.transposed)
            norms.append(float(torch.linalg.vector_norm(d)))
            merged += d
        merger = ChunkMerger(plan)
        out = merger.finish_full(raw, w0, merged, norms)
        writer_q.submit(writer.write, out)
        self.bar.update(out.numel() * out.element_size())
        self.stats[plan.name] = merger.summary()


class ChunkMerger:
    """Merges one tensor chunk by chunk; accumulates the numbers the manifest reports."""

    def __init__(self, plan: TensorPlan):
        self.plan = plan
        self.left = self.right = None
        if plan.deltas:
            factors = [lora_factors(c.module, c.weight, c.transposed) for c in plan.deltas]
            self.left = torch.cat([f[0] for f in factors], dim=1)  # (rows, Σr)
            self.right = torch.cat([f[1] for f in factors], dim=0)  # (Σr, cols)
            self.norms = [factors_norm(*f) for f in factors]
            self.delta_norm = factors_norm(self.left, self.right)
        self.bias = None
        if plan.bias_deltas:
            self.bias = sum(c.weight * c.module.scaling * c.module.lora_bias.float() for c in plan.bias_deltas)
            self.norms = [float(torch.linalg.vector_norm(c.weight * c.module.scaling * c.module.lora_bias.float())) for c in plan.bias_deltas]
            self.delta_norm = float(torch.linalg.vector_norm(self.bias))
        self.err_sq = 0.0
        self.err_max = 0.0
        self.unchanged = 0
        self.numel = 0

    def chunk(self, raw: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
        plan = self.plan
        if not plan.touched:
            return raw if raw.dtype == plan.out_dtype else self._cast(raw.float(), raw, None)
        w0 = plan.replacement[1][r0:r1] if plan.replacement else raw
        if self.left is None and self.bias is None:  # a plain replacement
            return w0.to(plan.out_dtype) if w0.dtype != plan.out_dtype else w0.clone()
        w0f = w0.float()
        if self.left is not None:
            merged = torch.addmm(w0f.reshape(r1 - r0, -1), self.left[r0:r1], self.right).reshape(w0f.shape)
        else:
            merged = w0f + self.bias[r0:r1]
        return self._cast(merged, w0, w0f)

    def finish_full(self, raw: torch.Tensor, w0: torch.Tensor, merged: torch.Tensor, norms: list[float]) -> torch.Tensor:
        self.norms = norms
        self.delta_norm = float(torch.linalg.vector_norm(merged - w0))
        source = self.plan.replacement[1] if self.plan.replacement else raw
        return self._cast(merged, source, w0)

    def _cast(self, merged: torch.Tensor, stored: torch.Tensor, w0f: torch.Tensor | None) -> torch.Tensor:
        """Cast once; measure what the cast lost. Non-finite values show up in these reductions (NaN propagates)."""
        self.numel += merged.numel()
        out = merged.to(self.plan.out_dtype)
        if self.plan.out_dtype != torch.float32:
            err = out.float().sub_(merged).reshape(-1)  # inf or NaN here when merged is non-finite or overflows the output dtype
            if err.numel():
                lo, hi = (float(v) for v in torch.aminmax(err))
                err_max = math.nan if math.isnan(lo) or math.isnan(hi) else max(-lo, hi)
                self.err_sq += float(torch.dot(err, err))
            else:
                err_max = 0.0
            self.err_max = max(self.err_max, err_max) if math.isfinite(err_max) else err_max
            if w0f is not None and stored.dtype == self.plan.out_dtype and stored.element_size() == 2:
                self.unchanged += int(torch.count_nonzero(out.view(torch.int16) == stored.view(torch.int16)))
            finite = math.isfinite(err_max)
        else:
            finite = merged.numel() == 0 or (math.isfinite(float(merged.amax())) and math.isfinite(float(merged.amin())))
        if w0f is not None and not finite:
            bad = int((~torch.isfinite(out)).sum())
            if bool(torch.isfinite(merged).all()):
                raise NonFiniteError(f"merged tensor {self.plan.name} overflows {dtype_name(self.plan.out_dtype)} ({bad} values beyond its range): merge to float32 or bfloat16")
            raise NonFiniteError(f"merged tensor {self.plan.name} has {bad} NaN/Inf values: the adapter's delta is broken or overflows")
        return out

    def summary(self) -> dict[str, Any]:
        plan = self.plan
        entry: dict[str, Any] = {"dtype": dtype_name(plan.out_dtype), "source": plan.source}
        contribs = plan.deltas or plan.bias_deltas
        if contribs:
            entry["adapters"] = [
                {"adapter": c.adapter, "module": c.module.path, "variant": c.module.variant, "r": c.module.r,
                 "lora_alpha": c.module.lora_alpha, "scaling": c.module.scaling, "weight": c.weight,
                 "transposed": c.transposed, "delta_norm": n}
                for c, n in zip(contribs, self.norms)
            ]
            entry["delta_norm"] = self.delta_norm
        if plan.replacement:
            entry["replaced_by_adapter"] = plan.replacement[0]
        if plan.out_dtype != torch.float32:
            entry["cast"] = {
                "max_abs_error": self.err_max,
                "error_norm": math.sqrt(self.err_sq),
                "error_norm_rel_to_delta": math.sqrt(self.err_sq) / self.delta_norm if contribs and self.delta_norm > 0 else None,
                "unchanged_after_cast_fraction": self.unchanged / self.numel if contribs and self.numel else None,
            }
        return entry


def _progress(total: int, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc="merge", disable=not enabled or not sys.stderr.isatty(), file=sys.stderr)


# ---------------------------------------------------------------------------------------------------------------------
# The verb


def merge(base_dir: Path | str, adapter_dirs: Sequence[Path | str], out_dir: Path | str, options: MergeOptions = MergeOptions()) -> MergeResult:
    """Merge PEFT LoRA adapters into a transformers model folder, writing a new folder transformers loads as it is."""
    started = time.perf_counter()
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    adapter_paths = [Path(a) for a in adapter_dirs]
    if not adapter_paths:
        raise LoraExportError("give at least one adapter folder")
    weights = tuple(options.weights) or (1.0,) * len(adapter_paths)
    if len(weights) != len(adapter_paths):
        raise LoraExportError(f"{len(weights)} weights given for {len(adapter_paths)} adapters: give one --weight per adapter, in order")
    if not all(math.isfinite(w) for w in weights):
        raise LoraExportError(f"adapter weights must be finite numbers, got {weights}")
    check_output_location(out_dir, [base_dir, *adapter_paths], options.overwrite)
    base = BaseModel.open(base_dir, options.allow_pickle)
    adapters = [load_adapter(p, options.allow_pickle) for p in adapter_paths]
    plans, untied, notes = plan_merge(base, adapters, weights, options.dtype)
    check_free_space(out_dir, sum(TensorSpec(p.name, p.out_dtype, p.shape).nbytes for p in plans))

    with atomic_output_dir(out_dir, options.overwrite) as tmp:
        stream = MergeStream(base, plans, tmp, options.max_shard_size, options.progress, options.rehash_output)
        written = stream.run()
        if len(written) > 1:
            write_index(tmp, stream.shards, stream.shard_names)
        problems = stream.checks.wait()
        if problems:
            raise OutputError(f"the weights written for {out_dir} do not read back as written (nothing was kept; a faulty disk or a "
                              "full or changing file system? try another output folder):\n  " + "\n  ".join(problems))
        out_dtypes = {p.out_dtype for p in plans if p.out_dtype.is_floating_point}
        copy_side_files(base.folder, tmp)
        write_config(base.config, tmp, options.dtype, out_dtypes, bool(untied))
        input_hashes = stream.input_hashes()
        manifest = {
            "tool": {"name": "lora-export", "version": __version__, "command": "merge"},
            "versions": library_versions(),
            "options": {**asdict(options), "weights": list(weights)},
            "base": {"path": str(base.folder.resolve()), "weights": [{"name": p.name, "sha256": input_hashes[p.name], "size": p.stat().st_size} for p in base.weight_files], "files": base.input_files()},
            "adapters": [{"path": str(a.path.resolve()), "weight": w, "files": a.files(), "config": a.config} for a, w in zip(adapters, weights)],
            "output": {
                "dtype": options.dtype if options.dtype != "auto" else sorted(dtype_name(d) for d in out_dtypes),
                "files": [asdict(f) for f in written],
                "untied": untied,
                "tie_word_embeddings": False if untied else base.tie_word_embeddings,
            },
            "notes": notes,
            "tensors": {name: stream.stats[name] for name in (p.name for p in plans) if name in stream.stats},
            "seconds": round(time.perf_counter() - started, 3),
        }
        write_json(tmp / MANIFEST, manifest)
    return MergeResult(out_dir, manifest)


def copy_side_files(src: Path, dst: Path) -> None:
    """Tokenizer, generation config, chat template…: everything of the base folder but its weights and our manifest."""
    for path in sorted(src.iterdir()):
        name = path.name
        if name in WEIGHT_FILES or name == MANIFEST or name.startswith(".") or name == "config.json":
            continue
        if (name.startswith("model-") and name.endswith(".safetensors")) or (name.startswith("pytorch_model-") and name.endswith(".bin")):
            continue
        if path.is_symlink():
            continue  # never follow links out of an input folder
        if path.is_dir():
            shutil.copytree(path, dst / name, symlinks=False)
        elif path.is_file():
            shutil.copy2(path, dst / name)


def write_config(config: dict[str, Any], folder: Path, dtype: str, out_dtypes: set[torch.dtype], untied: bool) -> None:
    config = dict(config)
    if dtype != "auto" or len(out_dtypes) == 1:
        name = dtype if dtype != "auto" else dtype_name(next(iter(out_dtypes)))
        config["dtype"] = name
        if "torch_dtype" in config:
            config["torch_dtype"] = name
    if untied:
        config["tie_word_embeddings"] = False
        if isinstance(config.get("text_config"), dict):
            config["text_config"] = {**config["text_config"], "tie_word_embeddings": False}
    write_json(folder / "config.json", with_legacy_rope(config))


def with_legacy_rope(config: dict[str, Any]) -> dict[str, Any]:
    """transformers 5 writes RoPE settings only as `rope_parameters`; 4.x reads only `rope_theta` / `rope_scaling` and
    otherwise silently falls back to its default θ (seen: SmolLM2's θ = 100000 read as 10000 by 4.57, logits off by
    10%). Write both, with the same values, so the merged folder means the same to either."""
    rope = config.get("rope_parameters")
    if not isinstance(rope, dict) or "rope_theta" not in rope or "rope_theta" in config:
        return config
    config = {**config, "rope_theta": rope["rope_theta"]}
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    if scaling.get("rope_type", "default") != "default" and "rope_scaling" not in config:
        config["rope_scaling"] = scaling
    return config


def library_versions() -> dict[str, str]:
    import platform

    import safetensors

    versions = {"python": platform.python_version(), "torch": torch.__version__, "safetensors": safetensors.__version__}
    if "transformers" in sys.modules:
        versions["transformers"] = sys.modules["transformers"].__version__
    else:
        from importlib.metadata import PackageNotFoundError, version

        try:
            versions["transformers"] = version("transformers")
        except PackageNotFoundError:
            pass
    return versions


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '2GiB' or a byte count → bytes."""
    if isinstance(text, int):
        return text
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    s = text.strip().upper().replace(" ", "")
    num = s.rstrip("KMGIB")
    unit = s[len(num):]
    try:
        value = float(num) * units[unit]
    except (ValueError, KeyError):
        raise LoraExportError(f"cannot read the size {text!r}: write e.g. 5GB, 500MB or 2GiB") from None
    if value <= 0:
        raise LoraExportError(f"size {text!r} must be positive")
    return int(value)


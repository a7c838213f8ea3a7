"""Fold LoRA deltas into the base weights: W = W0 + Σ wᵢ·ΔWᵢ, in fp32, cast once, streamed in row chunks.

The math of each variant is in delta.py (`delta_weight`, `lora_factors`), the planning of which tensor gets which
delta in plan.py, the streaming in stream.py; this module is the verb and what it writes beside the weights.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..io.errors import LoraExportError, OutputError, UnsafeInputError
from ..io.jsonio import write_json
from ..io.outputs import atomic_output_dir, check_free_space, check_output_location
from ..io.paths import checked_link
from ..io.tensorfiles import TensorSpec, WrittenFile, dtype_name, write_index
from ..model.adapters import LoraAdapter, load_adapter
from ..model.base import WEIGHT_FILES, BaseModel
from ..model.hub import folder_of, source_of
from ..records import AdapterRecord, FileRecord, MergeManifest, versions
from .plan import plan_merge
from .stream import MergeStream

MANIFEST = MergeManifest.NAME


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
    manifest: MergeManifest

    @property
    def merged_tensors(self) -> int:
        return self.manifest.merged_tensors

    @property
    def untied(self) -> list[str]:
        return list(self.manifest.untied)


def merge(
    base_dir: Path | str,
    adapter_dirs: Sequence[Path | str],
    out_dir: Path | str,
    options: MergeOptions = MergeOptions(),
) -> MergeResult:
    """Merge PEFT LoRA adapters into a transformers model folder, writing a new folder transformers loads as it is."""
    started = time.perf_counter()
    base_dir, out_dir = folder_of(base_dir, "base"), Path(out_dir)
    adapter_paths = [folder_of(a, "adapter") for a in adapter_dirs]
    weights = adapter_weights(options.weights, len(adapter_paths))
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
            raise OutputError(
                f"the weights written for {out_dir} do not read back as written (nothing was kept; a faulty disk or a "
                "full or changing file system? try another output folder):\n  " + "\n  ".join(problems)
            )
        out_dtypes = {p.out_dtype for p in plans if p.out_dtype.is_floating_point}
        copy_base_files(base.folder, tmp)
        write_config(base.config, tmp, options.dtype, out_dtypes, bool(untied))
        seconds = round(time.perf_counter() - started, 3)
        manifest = _manifest(base, adapters, weights, options, stream, written, untied, notes, out_dtypes, seconds)
        manifest.write(tmp)  # re-read through the reader's checks and compared
    return MergeResult(out_dir, manifest)


def adapter_weights(given: Sequence[float], adapters: int) -> tuple[float, ...]:
    """One finite weight per adapter (1.0 each when none are given)."""
    if not adapters:
        raise LoraExportError("give at least one adapter folder")
    weights = tuple(given) or (1.0,) * adapters
    if len(weights) != adapters:
        raise LoraExportError(
            f"{len(weights)} weights given for {adapters} adapters: give one --weight per adapter, in order"
        )
    if not all(math.isfinite(w) for w in weights):
        raise LoraExportError(f"adapter weights must be finite numbers, got {weights}")
    return weights


def _manifest(
    base: BaseModel,
    adapters: Sequence[LoraAdapter],
    weights: tuple[float, ...],
    options: MergeOptions,
    stream: MergeStream,
    written: list[WrittenFile],
    untied: dict[str, str],
    notes: list[str],
    out_dtypes: set[torch.dtype],
    seconds: float,
) -> MergeManifest:
    """lora_export.json: inputs with their hashes, options, what was written, per-tensor numbers."""
    hashes = stream.input_hashes()
    return MergeManifest(
        tool={"name": "lora-export", "version": __version__, "command": "merge"},
        versions=versions(),
        options={**asdict(options), "weights": list(weights)},
        base_path=str(base.folder.resolve()),
        base_weights=tuple(FileRecord(p.name, hashes[p.name], p.stat().st_size) for p in base.weight_files),
        base_files=tuple(FileRecord(**f) for f in base.input_files()),
        adapters=tuple(
            AdapterRecord(
                str(a.path.resolve()), w, tuple(FileRecord(**f) for f in a.files()), a.config, source_of(a.path)
            )
            for a, w in zip(adapters, weights, strict=True)
        ),
        dtype=options.dtype if options.dtype != "auto" else tuple(sorted(dtype_name(d) for d in out_dtypes)),
        files=tuple(FileRecord(f.name, f.sha256, f.size) for f in written),
        untied=untied,
        tie_word_embeddings=False if untied else base.tie_word_embeddings,
        notes=tuple(notes),
        tensors={p.name: stream.stats[p.name] for p in stream.plans if p.name in stream.stats},
        seconds=seconds,
        base_source=source_of(base.folder),
    )


def copy_base_files(src: Path, dst: Path) -> None:
    """Tokenizer, generation config, chat template…: everything of the base folder but its weights and our manifest.
    Links are followed only where they stay inside the folder (or a Hugging Face cache snapshot's blobs); anything
    that is not a regular file or folder (a FIFO, a device) is refused, since copying it would block or mislead."""
    for path in sorted(src.iterdir()):
        name = path.name
        if name in WEIGHT_FILES or name == MANIFEST or name.startswith(".") or name == "config.json":
            continue
        if (name.startswith("model-") and name.endswith(".safetensors")) or (
            name.startswith("pytorch_model-") and name.endswith(".bin")
        ):
            continue
        _copy_checked(src, path, dst / name)


def _copy_checked(root: Path, path: Path, dst: Path) -> None:
    checked_link(root, path, f"{root} (copied into the output)")
    if path.is_dir():
        dst.mkdir()
        for child in sorted(path.iterdir()):
            _copy_checked(root, child, dst / child.name)
    elif path.is_file():
        shutil.copy2(path, dst)
    else:
        raise UnsafeInputError(
            f"{path}: not a regular file or folder (a FIFO, socket or device); remove it from the model folder"
        )


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


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '2GiB' or a byte count → bytes."""
    if isinstance(text, int):
        return text
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    s = text.strip().upper().replace(" ", "")
    num = s.rstrip("KMGIB")
    unit = s[len(num) :]
    try:
        value = float(num) * units[unit]
    except (ValueError, KeyError):
        raise LoraExportError(f"cannot read the size {text!r}: write e.g. 5GB, 500MB or 2GiB") from None
    if not math.isfinite(value) or value < 1:
        raise LoraExportError(f"size {text!r} must be a finite, positive size, e.g. 5GB")
    return int(value)

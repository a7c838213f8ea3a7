"""The streaming merge: the base read in row chunks, ΔW added in float32, cast once, written to output shards as they
fill; reading, writing, hashing and re-reading run beside each other."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any

import torch

from ..io.errors import NonFiniteError
from ..io.hashing import CHUNK_BYTES, FileHasher
from ..io.tensorfiles import (
    SafetensorsStreamWriter,
    TensorSpec,
    WrittenFile,
    dtype_name,
    plan_shards,
    reread_shard,
    shard_file_names,
)
from ..io.workers import BackgroundChecks, OrderedWorker
from ..model.base import BaseModel
from .delta import delta_weight, factors_norm, lora_factors
from .plan import TensorPlan


class MergeStream:
    """Reads each planned tensor in row chunks, merges, casts, hands bytes to the writer; records statistics."""

    def __init__(
        self,
        base: BaseModel,
        plans: list[TensorPlan],
        out: Path,
        max_shard_size: int,
        progress: bool,
        rehash: bool = False,
    ):
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
        torch.set_num_threads(compute_threads())
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

    def _tensor(
        self, plan: TensorPlan, writer: SafetensorsStreamWriter, writer_q: OrderedWorker, hash_q: OrderedWorker
    ) -> None:
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

    def _dora_tensor(
        self,
        plan: TensorPlan,
        info: Any,
        hasher: FileHasher | None,
        writer: SafetensorsStreamWriter,
        writer_q: OrderedWorker,
        hash_q: OrderedWorker,
    ) -> None:
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
            self.norms = [
                float(torch.linalg.vector_norm(c.weight * c.module.scaling * c.module.lora_bias.float()))
                for c in plan.bias_deltas
            ]
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

    def finish_full(
        self, raw: torch.Tensor, w0: torch.Tensor, merged: torch.Tensor, norms: list[float]
    ) -> torch.Tensor:
        self.norms = norms
        self.delta_norm = float(torch.linalg.vector_norm(merged - w0))
        source = self.plan.replacement[1] if self.plan.replacement else raw
        return self._cast(merged, source, w0)

    def _cast(self, merged: torch.Tensor, stored: torch.Tensor, w0f: torch.Tensor | None) -> torch.Tensor:
        """Cast once; measure what the cast lost. Non-finite values show up in these reductions (NaN propagates)."""
        self.numel += merged.numel()
        out = merged.to(self.plan.out_dtype)
        if self.plan.out_dtype != torch.float32:
            err = (
                out.float().sub_(merged).reshape(-1)
            )  # inf or NaN here when merged is non-finite or overflows the output dtype
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
            finite = merged.numel() == 0 or (
                math.isfinite(float(merged.amax())) and math.isfinite(float(merged.amin()))
            )
        if w0f is not None and not finite:
            bad = int((~torch.isfinite(out)).sum())
            if bool(torch.isfinite(merged).all()):
                raise NonFiniteError(
                    f"merged tensor {self.plan.name} overflows {dtype_name(self.plan.out_dtype)} ({bad} values beyond its range): merge to float32 or bfloat16"
                )
            raise NonFiniteError(
                f"merged tensor {self.plan.name} has {bad} NaN/Inf values: the adapter's delta is broken or overflows"
            )
        return out

    def summary(self) -> dict[str, Any]:
        plan = self.plan
        entry: dict[str, Any] = {"dtype": dtype_name(plan.out_dtype), "source": plan.source}
        contribs = plan.deltas or plan.bias_deltas
        if contribs:
            entry["adapters"] = [
                {
                    "adapter": c.adapter,
                    "module": c.module.path,
                    "variant": c.module.variant,
                    "r": c.module.r,
                    "lora_alpha": c.module.lora_alpha,
                    "scaling": c.module.scaling,
                    "weight": c.weight,
                    "transposed": c.transposed,
                    "delta_norm": n,
                }
                for c, n in zip(contribs, self.norms)
            ]
            entry["delta_norm"] = self.delta_norm
        if plan.replacement:
            entry["replaced_by_adapter"] = plan.replacement[0]
        if plan.out_dtype != torch.float32:
            entry["cast"] = {
                "max_abs_error": self.err_max,
                "error_norm": math.sqrt(self.err_sq),
                "error_norm_rel_to_delta": math.sqrt(self.err_sq) / self.delta_norm
                if contribs and self.delta_norm > 0
                else None,
                "unchanged_after_cast_fraction": self.unchanged / self.numel if contribs and self.numel else None,
            }
        return entry


def compute_threads() -> int:
    """Threads for the merge's arithmetic: the cores this process may use, less one for the writer thread and one
    for the hasher (they run beside it the whole time), at least one."""
    return (
        max(1, len(os.sched_getaffinity(0)) - 2)
        if hasattr(os, "sched_getaffinity")
        else max(1, (os.cpu_count() or 1) - 2)
    )


def _progress(total: int, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        desc="merge",
        disable=not enabled or not sys.stderr.isatty(),
        file=sys.stderr,
    )

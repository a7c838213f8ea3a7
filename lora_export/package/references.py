"""A package's stored references (reference.npz: inputs and PyTorch's logits), re-run in the runtime that runs each
graph and compared with the runtime tolerance: by `package` after it rewrites a graph, and by `package --check`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..exporting.graphs import build_graph, position_ids_for
from ..exporting.onnx_check import session
from ..io.errors import InputError
from ..records import Check, MergedVariant
from ..records.package import PACKAGE_FIX
from ..verification.compare import Case, compare, metrics_check
from .genai import rerun_genai_references
from .shared_graph import run_with_adapter


def compare_logits(name: str, ref: np.ndarray, got: np.ndarray, mask: np.ndarray, dtype: str = "float32") -> Check:
    case = Case(name, {"attention_mask": torch.from_numpy(mask)})
    m = compare(case, "logits", torch.from_numpy(ref).float(), torch.from_numpy(np.asarray(got)).float())
    return metrics_check(name, "ONNX Runtime vs the stored reference logits (PyTorch)", "runtime", dtype, [m])


def rerun_merged(out_dir: Path, name: str, info: MergedVariant) -> Check:
    """A merged variant's stored reference, re-run where its graph runs (ONNX Runtime, or GenAI for the builder's)."""
    path = out_dir / info.folder / "reference.npz"
    if info.exporter == "genai":
        return rerun_genai_references(out_dir / info.folder, path, {}, info.dtype)
    ref, feeds = read_reference(path)
    got = packaged_session(out_dir / info.graph).run(["logits"], feeds)[0]
    return compare_logits(name, ref[f"logits:{name}"], got, feeds["attention_mask"], info.dtype)


def run_packaged_adapter(sess: Any, feeds: dict[str, np.ndarray], path: Path) -> np.ndarray:
    """The shared graph with a package's .onnx_adapter; one ONNX Runtime cannot read is bad input naming it."""
    import onnxruntime as ort

    try:
        ort.LoraAdapter().Load(str(path))
    except Exception as e:  # ONNX Runtime's RuntimeError from its adapter parser
        first = str(e).splitlines()[0].rsplit(") ", 1)[-1][:160] if str(e) else type(e).__name__
        raise InputError(f"{path}: ONNX Runtime cannot read this adapter ({first}); {PACKAGE_FIX}") from None
    return run_with_adapter(sess, feeds, path, ["logits"])[0]


def packaged_session(path: Path) -> Any:
    """A package's graph in ONNX Runtime; one that does not load (damaged under a manifest that hashes it) is bad
    input naming the file, not a crash."""
    try:
        return session(path)
    except Exception as e:  # ONNX Runtime raises its own exception types for an unreadable model
        first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise InputError(f"{path}: ONNX Runtime cannot load it ({first}); {PACKAGE_FIX}") from None


def read_reference(path: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """A dynamo layout's reference.npz: every array, and the inputs among them."""
    try:
        with np.load(path) as archive:
            ref = {k: archive[k] for k in archive.files}
    except Exception as e:  # a damaged archive under a manifest that hashes it: the package was built so
        raise InputError(f"{path}: cannot read the reference outputs ({e}); {PACKAGE_FIX}") from None
    missing = [k for k in ("input:attention_mask",) if k not in ref]
    if missing:
        raise InputError(f"{path}: the reference outputs lack {missing[0]}; {PACKAGE_FIX}")
    return ref, {k.split(":", 1)[1]: v for k, v in ref.items() if k.startswith("input:")}


def reference_inputs(model: torch.nn.Module, seed: int = 0) -> tuple[list[str], dict[str, np.ndarray], torch.Tensor]:
    """The dynamo layouts' reference inputs: two rows of 9 random ids, one left-padded, and an empty cache."""
    graph = build_graph(model, with_past=True)
    vocab = int(model.config.get_text_config().vocab_size)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, 9), generator=g)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0  # one left-padded row
    dtype = next(model.parameters()).dtype
    empty = [
        torch.zeros(2, graph.cache.kv_heads, 0, graph.cache.head_dim, dtype=dtype)
        for _ in range(2 * graph.cache.layers)
    ]
    inputs = (ids, mask, position_ids_for(mask, 9), *empty)
    return graph.input_names, {n: t.numpy() for n, t in zip(graph.input_names, inputs)}, mask


def torch_logits(model: torch.nn.Module, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """PyTorch's logits on the reference inputs, through the exported graph's contract."""
    graph = build_graph(model, with_past=True)
    with torch.no_grad():
        return graph.module(*[torch.from_numpy(feeds[n]) for n in graph.input_names])[0].float().numpy()

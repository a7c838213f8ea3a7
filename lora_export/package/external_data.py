"""ONNX external data shared across graphs: tensors identical (by content) in several models written once and
hard-linked beside each graph, the rest in each graph's own data file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..exporting.genai_reuse import link_or_copy, place, point
from ..io.errors import ExportError


def load_with_data(path: Path) -> Any:
    """A graph this package wrote, with its external data read in. onnx.load refuses a data file with several hard
    links (a guard for files it did not write), and a merged variant's common.data is one: a link to the base
    graph's data. The data files must lie beside the graph."""
    import numpy as np
    import onnx
    from onnx.external_data_helper import uses_external_data

    model = onnx.load(str(path), load_external_data=False)
    files: dict[str, Any] = {}
    for tensor in model.graph.initializer:
        if not uses_external_data(tensor):
            continue
        info = {e.key: e.value for e in tensor.external_data}
        name = info["location"]
        if Path(name).name != name:
            raise ExportError(f"{path}: tensor {tensor.name} points outside its folder ({name})")
        data = files.setdefault(name, np.memmap(path.parent / name, dtype=np.uint8, mode="r"))
        start = int(info.get("offset", 0))
        end = start + int(info["length"]) if "length" in info else len(data)
        tensor.raw_data = data[start:end].tobytes()
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.DEFAULT
    return model


def write_external_data(models: dict[str, Any], folders: dict[str, Path], staging: Path) -> tuple[int, int, bool]:
    """Write each model as FOLDER/model.onnx with its tensors in common.data (those found, by content, in more
    than one model; written once, then hard-linked into every folder) or model.onnx.data. Returns the number of
    common tensors, the bytes not written twice, and whether hard links worked (else common.data is copied)."""
    import onnx
    from onnx import numpy_helper

    seen: dict[str, set[str]] = {}  # by content, not name: the exporter names folded constants differently
    for n, m in models.items():
        for t in m.graph.initializer:
            seen.setdefault(sha256_bytes(numpy_helper.to_array(t).tobytes()), set()).add(n)

    common: dict[str, list[tuple[str, str]]] = {}
    saved = 0
    with staging.open("wb") as common_data:
        for n, model in models.items():
            with (folders[n] / "model.onnx.data").open("wb") as own:
                for t in model.graph.initializer:
                    raw = numpy_helper.to_array(t).tobytes()
                    digest = sha256_bytes(raw)
                    if len(seen[digest]) == 1:
                        point(t, place(own, "model.onnx.data", raw))
                        continue
                    if digest in common:
                        saved += len(raw)
                    else:
                        common[digest] = place(common_data, "common.data", raw)
                    point(t, common[digest])
            onnx.save(model, str(folders[n] / "model.onnx"))
    linked = all([link_or_copy(staging, folder / "common.data") for folder in folders.values()])
    staging.unlink()
    return len(common), saved, linked


def sha256_bytes(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()

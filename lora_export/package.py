"""`lora-export package`: task variants (one base, many adapters) for production runtimes, and `--check`.

Layouts: `merged` — one merged, verified ONNX model per variant (merge-and-onnx each); `shared` — one base ONNX graph
whose LoRA A/B are overridable inputs with zero-rank defaults, plus one `.onnx_adapter` file per variant, selected per
request with `RunOptions.add_active_adapter`. `manifest.json` records every file's sha256 and size, the variants,
the checks with their tolerances, and the storage each layout takes. Each layout keeps reference inputs and outputs
(`reference.npz`) so that `package --check` re-verifies a package with ONNX Runtime alone: hashes first, then numbers.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .adapters import load_adapter
from .errors import InputError, UnsafeInputError, VerifyError
from .exporters.graphs import build_graph, position_ids_for
from .exporters.onnx import OnnxOptions, session
from .lora_runtime import load_model, load_unmerged
from .merge import MergeOptions
from .pipeline import SIDE_FILES, ExportOptions, _files, _versions, merge_and_onnx
from .shared_graph import build_shared_graph, run_with_adapter, union_modules, variant_factors, write_adapter_file
from .tensors import atomic_output_dir, check_output_location, read_json_object, sha256_file, write_json
from .verify import TOLERANCES, Case, compare

MODES = ("merged", "shared", "both")
NAME_OK = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


@dataclass(frozen=True)
class Variant:
    name: str
    adapters: list[tuple[Path, float]]
    dtype: str


def read_variants(path: Path) -> list[Variant]:
    """variants.yaml (or .json): {variants: {name: {adapters: [path | {path, weight}], dtype?}}}; paths relative to the file."""
    if not path.is_file():
        raise InputError(f"{path} does not exist: give a variants.yaml listing the task variants")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:
        raise InputError(f"{path}: not valid {'YAML' if path.suffix in ('.yaml', '.yml') else 'JSON'}: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict) or not isinstance(data.get("variants"), dict) or not data["variants"]:
        raise InputError(f"{path}: expected a top-level `variants:` mapping of names to {{adapters: [...]}}")
    out = []
    for name, spec in data["variants"].items():
        where = f"{path}: variant {name!r}"
        if not isinstance(name, str) or not name or set(name) - NAME_OK or name.startswith("."):
            raise InputError(f"{where}: names become file names: use letters, digits, '-', '_' and '.'")
        if not isinstance(spec, dict) or not isinstance(spec.get("adapters"), list) or not spec["adapters"]:
            raise InputError(f"{where}: needs `adapters:`, a list of paths or {{path, weight}}")
        unknown = set(spec) - {"adapters", "dtype"}
        if unknown:
            raise InputError(f"{where}: unknown field(s) {sorted(unknown)}: only `adapters` and `dtype`")
        adapters = []
        for item in spec["adapters"]:
            if isinstance(item, str):
                item = {"path": item}
            if not isinstance(item, dict) or not isinstance(item.get("path"), str) or set(item) - {"path", "weight"}:
                raise InputError(f"{where}: each adapter is a path or {{path: ..., weight: ...}}, found {item!r}")
            weight = item.get("weight", 1.0)
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not np.isfinite(weight):
                raise InputError(f"{where}: weight must be a finite number, found {weight!r}")
            p = (path.parent / item["path"]).resolve()
            if not p.is_dir():
                raise InputError(f"{where}: adapter folder {item['path']} not found (paths are relative to {path.parent})")
            adapters.append((p, float(weight)))
        dtype = spec.get("dtype", "auto")
        if dtype not in ("auto", "float32", "float16"):
            raise InputError(f"{where}: dtype must be auto, float32 or float16 (bfloat16 cannot run in ONNX Runtime's CPU provider), found {dtype!r}")
        out.append(Variant(name, adapters, dtype))
    return out


def _reference_inputs(model: torch.nn.Module, seed: int = 0) -> tuple[list[str], dict[str, np.ndarray], torch.Tensor]:
    graph = build_graph(model, with_past=True)
    vocab = int(model.config.get_text_config().vocab_size)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, 9), generator=g)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0  # one left-padded row
    dtype = next(model.parameters()).dtype
    empty = [torch.zeros(2, graph.cache.kv_heads, 0, graph.cache.head_dim, dtype=dtype) for _ in range(2 * graph.cache.layers)]
    inputs = (ids, mask, position_ids_for(mask, 9), *empty)
    return graph.input_names, {n: t.numpy() for n, t in zip(graph.input_names, inputs)}, mask


def _logits(model: torch.nn.Module, feeds: dict[str, np.ndarray]) -> np.ndarray:
    graph = build_graph(model, with_past=True)
    with torch.no_grad():
        return graph.module(*[torch.from_numpy(feeds[n]) for n in graph.input_names])[0].float().numpy()


def _compare(name: str, ref: np.ndarray, got: np.ndarray, mask: np.ndarray) -> dict[str, Any]:
    m = compare(Case(name, {"attention_mask": torch.from_numpy(mask)}), "logits", torch.from_numpy(ref).float(), torch.from_numpy(np.asarray(got)).float())
    failures = m.failures(TOLERANCES["float32"])
    return {"check": name, "passed": not failures, "max_rel": m.max_rel, "max_abs": m.max_abs, "failures": failures}


def _shared(base_dir: Path, variants: list[Variant], out: Path, log: Callable[[str], None]) -> dict[str, Any]:
    log("shared layout: exporting the base graph with swappable LoRA inputs …")
    modules, loaded = union_modules(base_dir, {v.name: v.adapters for v in variants})
    shared = out / "shared"
    shared.mkdir()
    graph = build_shared_graph(base_dir, modules, shared / "model.onnx", OnnxOptions(with_past=True))
    for f in SIDE_FILES:
        if (base_dir / f).is_file():
            shutil.copy2(base_dir / f, shared / f)
    base = load_model(base_dir)
    names, feeds, mask = _reference_inputs(base)
    sess = session(graph.path)
    references = {"__base__": _logits(base, feeds)}
    checks = [_compare("shared graph, no adapter vs base (PyTorch)", references["__base__"], run_with_adapter(sess, feeds, None, ["logits"])[0], mask.numpy())]
    files = {}
    for v in variants:
        path = shared / f"{v.name}.onnx_adapter"
        shapes = write_adapter_file(path, variant_factors(loaded[v.name]), np.float32)
        files[v.name] = {"file": path.name, "parameters": shapes}
        unmerged = load_unmerged(base_dir, [p for p, _ in v.adapters], [w for _, w in v.adapters])
        references[v.name] = _logits(unmerged, feeds)
        got = run_with_adapter(sess, feeds, path, ["logits"])[0]
        checks.append(_compare(f"shared graph + {path.name} vs {v.name} in PyTorch", references[v.name], got, mask.numpy()))
    np.savez(shared / "reference.npz", **{f"input:{k}": v for k, v in feeds.items()}, **{f"logits:{k}": v for k, v in references.items()})
    notes = [f"variant {v.name}: dtype {v.dtype} applies to its merged layout; the shared graph and its adapters are float32"
             for v in variants if v.dtype not in ("auto", "float32")]
    return {"graph": "shared/model.onnx", "dtype": "float32", "inputs": names, "outputs": graph.export.output_names, "lora_inputs": {m: list(v) for m, v in graph.inputs.items()},
            "adapters": files, "checks": checks, "notes": notes}


def _merged(base_dir: Path, variants: list[Variant], out: Path, log: Callable[[str], None]) -> dict[str, Any]:
    results = {}
    for v in variants:
        log(f"merged layout: {v.name} …")
        folder = out / "merged" / v.name
        folder.parent.mkdir(exist_ok=True)
        result = merge_and_onnx(base_dir, [p for p, _ in v.adapters], folder, MergeOptions(dtype=v.dtype, weights=tuple(w for _, w in v.adapters), progress=False),
                                ExportOptions(onnx=OnnxOptions(max_new_tokens=8)), log=log)
        model = load_model(folder / "merged", torch.float16 if result.report["export"]["dtype"] == "float16" else torch.float32)
        _, feeds, _ = _reference_inputs(model)
        np.savez(folder / "reference.npz", **{f"input:{k}": a for k, a in feeds.items()}, **{f"logits:{v.name}": _logits(model, feeds)})
        results[v.name] = {"folder": f"merged/{v.name}", "dtype": result.report["export"]["dtype"],
                           "checks": [{"check": c.name, "passed": c.passed, "summary": c.summary} for c in result.checks]}
    return results


def dedupe_merged(out: Path, merged: dict[str, Any]) -> dict[str, Any]:
    """Store the merged variants' graphs in merged-onnx/: tensors identical in every variant once, in common.data,
    the rest in NAME.data (ONNX external data; each NAME.onnx refers to both, in the same folder, as ONNX Runtime
    requires). The per-variant merged/NAME/model.onnx copies are removed; each new graph is checked against the
    variant's reference outputs before they go."""
    import onnx
    from onnx import numpy_helper

    names = list(merged)
    models = {n: onnx.load(str(out / merged[n]["folder"] / "model.onnx")) for n in names}
    # by content, not name: the exporter names folded constants differently in each export
    seen: dict[str, set[str]] = {}
    for n, m in models.items():
        for t in m.graph.initializer:
            seen.setdefault(sha256_bytes(numpy_helper.to_array(t).tobytes()), set()).add(n)
    folder = out / "merged-onnx"
    folder.mkdir()

    def place(data: Any, location: str, raw: bytes) -> list[tuple[str, str]]:
        data.write(b"\0" * (-data.tell() % 64))  # 64-byte aligned, as ONNX Runtime prefers for memory mapping
        offset = data.tell()
        data.write(raw)
        return [("location", location), ("offset", str(offset)), ("length", str(len(raw)))]

    def point(tensor: Any, entries: list[tuple[str, str]]) -> None:
        for f in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
            tensor.ClearField(f)
        del tensor.external_data[:]
        for key, value in entries:
            tensor.external_data.add(key=key, value=value)
        tensor.data_location = onnx.TensorProto.EXTERNAL

    common: dict[str, list[tuple[str, str]]] = {}
    common_data = (folder / "common.data").open("wb")
    saved = 0  # bytes of shared tensors not written again
    for n in names:
        with (folder / f"{n}.data").open("wb") as own:
            for t in models[n].graph.initializer:
                raw = numpy_helper.to_array(t).tobytes()
                digest = sha256_bytes(raw)
                if len(seen[digest]) > 1:
                    if digest in common:
                        saved += len(raw)
                    else:
                        common[digest] = place(common_data, "common.data", raw)
                    point(t, common[digest])
                else:
                    point(t, place(own, f"{n}.data", raw))
        onnx.save(models[n], str(folder / f"{n}.onnx"))
    common_data.close()
    for n in names:
        ref = np.load(out / merged[n]["folder"] / "reference.npz")
        feeds = {k.split(":", 1)[1]: ref[k] for k in ref.files if k.startswith("input:")}
        check = _compare(f"merged-onnx/{n}.onnx (shared tensors) vs reference", ref[f"logits:{n}"], session(folder / f"{n}.onnx").run(["logits"], feeds)[0], feeds["attention_mask"])
        if not check["passed"]:
            raise VerifyError(f"{folder / (n + '.onnx')}: differs from the variant's reference after sharing tensors: {check['failures']}")
        merged[n]["graph"] = f"merged-onnx/{n}.onnx"
        merged[n]["checks"].append({"check": check["check"], "passed": True, "summary": f"max rel {check['max_rel']:.2g}"})
        for f in (out / merged[n]["folder"]).glob("model.onnx*"):
            f.unlink()
    return {"common_tensors": len(common), "saved_bytes": saved, "common_bytes": (folder / "common.data").stat().st_size,
            "per_variant_bytes": {n: (folder / f"{n}.data").stat().st_size for n in names}}


def sha256_bytes(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def package(base_dir: Path | str, variants_file: Path | str, out_dir: Path | str, mode: str = "both", overwrite: bool = False,
            log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    started = time.perf_counter()
    base_dir, variants_file, out_dir = Path(base_dir), Path(variants_file), Path(out_dir)
    if mode not in MODES:
        raise InputError(f"mode must be one of {', '.join(MODES)}")
    variants = read_variants(variants_file)
    check_output_location(out_dir, [base_dir, *{p for v in variants for p, _ in v.adapters}], overwrite)
    with atomic_output_dir(out_dir, overwrite) as tmp:
        manifest: dict[str, Any] = {"tool": "lora-export package", "base": str(base_dir), "mode": mode, "versions": _versions(),
                                    "tolerance": {"float32": TOLERANCES["float32"].max_rel},
                                    "variants": {v.name: {"dtype": v.dtype, "adapters": [
                                        {"path": str(p), "weight": w, "sha256": load_adapter(p).sha256} for p, w in v.adapters]} for v in variants}}
        if mode in ("shared", "both"):
            manifest["shared"] = _shared(base_dir, variants, tmp, log)
        if mode in ("merged", "both"):
            manifest["merged"] = _merged(base_dir, variants, tmp, log)
            if len(variants) > 1:
                log("merged layout: storing tensors identical across variants once …")
                manifest["merged_sharing"] = dedupe_merged(tmp, manifest["merged"])
        checks = [c["passed"] for c in manifest.get("shared", {}).get("checks", [])]
        checks += [c["passed"] for v in manifest.get("merged", {}).values() for c in v["checks"]]
        manifest["passed"] = all(checks)
        manifest["storage"] = storage_summary(tmp, variants, mode)
        manifest["files"] = _files(tmp)
        manifest["seconds"] = time.perf_counter() - started
        if not manifest["passed"]:
            raise VerifyError("a package check failed: " + "; ".join(c["check"] for c in manifest.get("shared", {}).get("checks", []) if not c["passed"]))
        write_json(tmp / "manifest.json", manifest)
    return manifest


def storage_summary(folder: Path, variants: list[Variant], mode: str) -> dict[str, Any]:
    """Bytes on disk: N merged models vs one base graph plus N adapter files (the paper's storage argument)."""
    def size(pattern: str) -> int:
        return sum(p.stat().st_size for p in folder.glob(pattern) if p.is_file())

    out: dict[str, Any] = {"variants": len(variants)}
    if mode in ("shared", "both"):
        graph = size("shared/model.onnx*")
        adapters = size("shared/*.onnx_adapter")
        out["shared"] = {"base_graph_bytes": graph, "adapter_files_bytes": adapters, "total_bytes": graph + adapters}
        out["merged_estimate_bytes"] = graph * len(variants)
    if mode in ("merged", "both"):
        out["merged"] = {"onnx_bytes": size("merged/*/model.onnx*") + size("merged-onnx/*"), "with_merged_folders_bytes": size("merged/**/*")}
    return out


def check_manifest(manifest: dict[str, Any], path: Path) -> set[str]:
    """The structure check_package relies on, before any file is opened: every file a relative path inside the
    package with a sha256 and a size, and every graph or adapter file the checks run named among those files.
    Returns the names of the listed files."""
    damaged = f"{path}: damaged manifest"
    fix = "rebuild the package with lora-export package"
    files = manifest.get("files")
    if not isinstance(files, list) or not all(isinstance(f, dict) and isinstance(f.get("name"), str) and isinstance(f.get("sha256"), str)
                                              and isinstance(f.get("size"), int) for f in files):
        raise InputError(f"{damaged}: `files` must list {{name, sha256, size}} entries; {fix}")
    for f in files:
        name = f["name"]
        if not name or name.startswith("/") or "\\" in name or ".." in Path(name).parts:
            raise UnsafeInputError(f"{path}: file name {name!r} points outside the package: refusing to read it; {fix}")
    listed = {f["name"] for f in files}
    used: list[Any] = []
    shared = manifest.get("shared")
    if shared is not None:
        adapters = shared.get("adapters") if isinstance(shared, dict) else None
        if not isinstance(adapters, dict) or not all(isinstance(i, dict) for i in adapters.values()):
            raise InputError(f"{damaged}: `shared.adapters` must map variant names to {{file: ...}}; {fix}")
        used += ["shared/model.onnx", "shared/reference.npz", *(f"shared/{i.get('file')}" for i in adapters.values())]
    merged = manifest.get("merged", {})
    if not isinstance(merged, dict) or not all(isinstance(i, dict) and isinstance(i.get("folder"), str) for i in merged.values()):
        raise InputError(f"{damaged}: `merged` must map variant names to {{folder: ...}}; {fix}")
    for info in merged.values():
        used += [f"{info['folder']}/reference.npz", info.get("graph", f"{info['folder']}/model.onnx")]
    for name in used:
        if name not in listed:
            raise InputError(f"{damaged}: the checks need {name}, which is not among its hashed files; {fix}")
    return listed


def check_package(out_dir: Path | str) -> dict[str, Any]:
    """Re-verify a package from its manifest: every file's sha256 and size, then the numbers in ONNX Runtime."""
    out_dir = Path(out_dir)
    manifest_path = out_dir / "manifest.json"
    if not manifest_path.is_file():
        raise InputError(f"{out_dir} has no manifest.json: is it a lora-export package?")
    manifest = read_json_object(manifest_path, "", fix=": rebuild the package with lora-export package")
    listed = check_manifest(manifest, manifest_path)
    problems = []
    for f in manifest["files"]:
        p = out_dir / f["name"]
        if not p.is_file():
            problems.append(f"{f['name']}: missing")
        elif p.stat().st_size != f["size"] or sha256_file(p) != f["sha256"]:
            problems.append(f"{f['name']}: sha256/size differ from the manifest")
    extra = sorted(str(p.relative_to(out_dir)) for p in out_dir.rglob("*") if p.is_file() and p.name != "manifest.json" and str(p.relative_to(out_dir)) not in listed)
    problems += [f"{name}: not in the manifest" for name in extra]
    file_problems = list(problems)
    results: list[dict[str, Any]] = []
    if not problems:  # numbers only when the bytes are what was verified
        if "shared" in manifest:
            ref = np.load(out_dir / "shared" / "reference.npz")
            feeds = {k.split(":", 1)[1]: ref[k] for k in ref.files if k.startswith("input:")}
            mask = feeds["attention_mask"]
            sess = session(out_dir / "shared" / "model.onnx")
            results.append(_compare("shared, no adapter", ref["logits:__base__"], run_with_adapter(sess, feeds, None, ["logits"])[0], mask))
            for name, info in manifest["shared"]["adapters"].items():
                got = run_with_adapter(sess, feeds, out_dir / "shared" / info["file"], ["logits"])[0]
                results.append(_compare(f"shared + {info['file']}", ref[f"logits:{name}"], got, mask))
        for name, info in manifest.get("merged", {}).items():
            folder = out_dir / info["folder"]
            ref = np.load(folder / "reference.npz")
            feeds = {k.split(":", 1)[1]: ref[k] for k in ref.files if k.startswith("input:")}
            got = session(out_dir / info.get("graph", f"{info['folder']}/model.onnx")).run(["logits"], feeds)[0]
            results.append(_compare(f"merged {name}", ref[f"logits:{name}"], got, feeds["attention_mask"]))
        problems += [f"{r['check']}: {'; '.join(r['failures'])}" for r in results if not r["passed"]]
    return {"passed": not problems, "problems": problems, "file_problems": file_problems, "numerical_checks": results, "files": len(manifest["files"])}

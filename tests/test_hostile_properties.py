"""Property tests of issue 14: mutated valid inputs (types, values, truncation, encodings) are handled — exit 0 or 2,
never a traceback, nothing half-written, inputs unchanged; the readers of records load or raise one InputError."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from conftest import copy_adapter, run_merge
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_hostile import copy_base, tree_hash

# ---------------------------------------------------------------------------------------------------------------------
# Property: mutated valid files are handled (exit 0 or 2), never a traceback, nothing half-written, inputs unchanged

JSON_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8), st.lists(st.integers(-3, 3), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)  # fmt: skip
TARGETS = [
    "base/config.json",
    "adapter/adapter_config.json",
    "base/model.safetensors",
    "adapter/adapter_model.safetensors",
]


@st.composite
def mutations(draw: st.DrawFn) -> tuple[str, str, object]:
    target = draw(st.sampled_from(TARGETS))
    if target.endswith(".json"):
        kind = draw(st.sampled_from(["set", "delete", "truncate", "bytes"]))
    else:
        kind = draw(st.sampled_from(["truncate", "bytes", "header"]))
    value = draw(JSON_VALUES) if kind in ("set", "header") else draw(st.integers(0, 10**6))
    return target, kind, value


def mutate(root: Path, target: str, kind: str, value: object) -> None:
    path = root / target
    raw = path.read_bytes()
    if kind == "truncate":
        path.write_bytes(raw[: int(value) % max(len(raw), 1)])
    elif kind == "bytes":
        i = int(value) % max(len(raw), 1)
        path.write_bytes(raw[:i] + b"\xff\xfe\x00" + raw[i + 3 :])
    elif kind == "header":  # a safetensors header entry's dtype or shape replaced
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8 : 8 + n])
        name = sorted(k for k in header if k != "__metadata__")[0]
        header[name]["shape" if isinstance(value, list) else "dtype"] = value
        blob = json.dumps(header).encode()
        path.write_bytes(len(blob).to_bytes(8, "little") + blob + raw[8 + n :])
    else:
        data = json.loads(raw)
        keys = sorted(data)
        key = keys[int(hashlib.sha256(repr(value).encode()).hexdigest(), 16) % len(keys)]
        if kind == "delete":
            del data[key]
        else:
            data[key] = value
        path.write_text(json.dumps(data))


@settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(mutation=mutations())
def test_mutated_inputs_are_handled(
    good: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory, mutation: tuple
) -> None:
    root = tmp_path_factory.mktemp("mutated")
    copy_base(good[0], root / "base")
    copy_adapter(good[1], root / "adapter")
    mutate(root, *mutation)
    before = tree_hash(root / "base") + tree_hash(root / "adapter")
    code, output = run_merge(root / "base", root / "adapter", root / "out")
    assert code in (0, 2), (mutation, output)
    assert "Traceback" not in output and "internal error" not in output, (mutation, output)
    if code == 2:
        assert len([line for line in output.splitlines() if line.startswith("Error: ")]) == 1, output
        assert not (root / "out").exists()
    assert not list(root.glob(".out.*")), "a partial folder or lock was left"
    assert tree_hash(root / "base") + tree_hash(root / "adapter") == before, "inputs changed"
    shutil.rmtree(root)


def mutate_tree(data: object, path: list[int], value: object) -> object:
    """`data` with one node replaced by `value`: the node reached by following `path` (indices modulo each level)."""
    if not path or not isinstance(data, (dict, list)) or not data:
        return value
    keys = sorted(data) if isinstance(data, dict) else list(range(len(data)))
    key = keys[path[0] % len(keys)]
    copy = dict(data) if isinstance(data, dict) else list(data)
    copy[key] = mutate_tree(data[key], path[1:], value)  # type: ignore[index]
    return copy


@settings(max_examples=100, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(
    path=st.lists(st.integers(0, 50), max_size=5), value=JSON_VALUES, which=st.sampled_from(["manifest", "variants"])
)
def test_mutated_records_load_or_refuse(good: tuple[Path, Path], merged_manifest: dict, tmp_path_factory: pytest.TempPathFactory, path: list[int], value: object, which: str) -> None:  # fmt: skip
    """The readers of what the tool wrote (lora_export.json) and of variants files: a mutated file loads (and then
    holds what its types promise) or is one InputError naming the file; nothing else escapes."""
    from lora_export.io.errors import InputError
    from lora_export.package.variants import read_variants
    from lora_export.records import MergeManifest

    root = tmp_path_factory.mktemp("records")
    if which == "manifest":
        data = mutate_tree(merged_manifest, path, value)
        try:
            MergeManifest.from_dict(data, root / "lora_export.json")
        except InputError as e:
            assert "lora_export.json" in str(e) and "\n" not in str(e)
    else:
        valid = {
            "variants": {"a": {"adapters": [str(good[1]), {"path": str(good[1]), "weight": 0.5}], "dtype": "float16"}}
        }
        (root / "v.json").write_text(json.dumps(mutate_tree(valid, path, value)))
        try:
            for v in read_variants(root / "v.json"):
                assert all(isinstance(w, float) and w == w for _, w in v.adapters)
        except InputError as e:
            assert "v.json" in str(e) and "\n" not in str(e)


@pytest.fixture(scope="module")
def merged_manifest(good: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("m") / "merged"
    assert run_merge(good[0], good[1], out)[0] == 0
    return json.loads((out / "lora_export.json").read_text())

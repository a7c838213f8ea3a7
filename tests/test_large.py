"""A model larger than the memory the merge may use: the streaming path must not need the model in memory.

The merge runs in a subprocess whose address space is capped (RLIMIT_AS, what `ulimit -v` sets) below the model's
size; a control shows the cap bites: loading the same file whole under the same cap fails.
"""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lora_export.io.tensorfiles import SafetensorsStreamWriter, TensorSpec

DIM, LAYERS, RANK, ALPHA = 4096, 24, 8, 16  # 24 × 4096² fp32 = 1.5 GiB
LIMIT = 1408 * 2**20  # 1.375 GiB of address space: torch alone maps ~1 GiB of it


def limited(limit: int):  # noqa: ANN201
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return apply


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("big")
    base, adapter = root / "base", root / "adapter"
    base.mkdir()
    adapter.mkdir()
    specs = [TensorSpec(f"layers.{i}.proj.weight", torch.float32, (DIM, DIM)) for i in range(LAYERS)]
    writer = SafetensorsStreamWriter(
        base / "model.safetensors", specs
    )  # written in pieces: the test process stays small too
    g = torch.Generator().manual_seed(0)
    for _ in specs:
        for _ in range(0, DIM, 512):
            writer.write(torch.randn(512, DIM, generator=g))
    writer.close()
    (base / "config.json").write_text(json.dumps({"model_type": "generated", "tie_word_embeddings": False}))
    save_file(
        {
            f"base_model.model.layers.{i}.proj.lora_{ab}.weight": torch.randn(*shape, generator=g) * 0.05
            for i in range(LAYERS)
            for ab, shape in (("A", (RANK, DIM)), ("B", (DIM, RANK)))
        },
        adapter / "adapter_model.safetensors",
    )
    (adapter / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": RANK, "lora_alpha": ALPHA, "target_modules": ["proj"]})
    )
    yield base, adapter
    shutil.rmtree(root)  # 1.5 GB: not kept among pytest's last three runs


def test_merge_of_a_model_larger_than_the_memory_limit(big: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = big
    model_bytes = (base / "model.safetensors").stat().st_size
    assert model_bytes > LIMIT
    control = subprocess.run(
        [
            sys.executable,
            "-c",
            f"from safetensors.torch import load_file; load_file({str(base / 'model.safetensors')!r})",
        ],
        capture_output=True,
        text=True,
        preexec_fn=limited(LIMIT),
    )
    assert control.returncode != 0 and (
        "MemoryError" in control.stderr or "Cannot allocate memory" in control.stderr
    ), control.stderr

    out = tmp_path / "merged"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "lora_export",
            "merge",
            str(base),
            str(adapter),
            "-o",
            str(out),
            "-q",
            "--max-shard-size",
            "1GB",
        ],
        capture_output=True,
        text=True,
        preexec_fn=limited(LIMIT),
    )
    assert done.returncode == 0, done.stderr
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) == 2 and sum(f.stat().st_size for f in shards) >= model_bytes

    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as a:
        for i in (0, LAYERS - 1):
            name = f"layers.{i}.proj.weight"
            with safe_open(str(base / "model.safetensors"), "pt") as b:
                w0 = b.get_tensor(name)
            shard = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"][name]
            with safe_open(str(out / shard), "pt") as m:
                got = m.get_tensor(name)
            want = w0 + (ALPHA / RANK) * a.get_tensor(f"base_model.model.{name[:-7]}.lora_B.weight") @ a.get_tensor(
                f"base_model.model.{name[:-7]}.lora_A.weight"
            )
            assert (got - want).abs().max() <= 1e-6 * want.abs().max(), name
    shutil.rmtree(out)

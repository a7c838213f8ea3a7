"""inspect: the spectrum from the factors equals the SVD of the formed ΔW; the amplification factor; compatibility."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from click.testing import CliRunner
from conftest import make_adapter

from lora_export.cli import main
from lora_export.merging.inspect import inspect_adapter
from lora_export.model.adapters import load_adapter


def test_spectrum_and_amplification_match_formed_delta(models_dir: Path, tmp_path: Path) -> None:
    base = models_dir / "gpt2"
    adapter = make_adapter(base, tmp_path / "a", target_modules=["c_attn", "c_fc"], r=4, lora_alpha=16)
    info = inspect_adapter(adapter, base)
    assert info.compatible is True and info.incompatibility is None
    loaded = load_adapter(adapter)
    from safetensors.torch import load_file

    w = load_file(base / "model.safetensors")
    for entry in info.modules:
        m = loaded.modules[entry.module]
        delta = m.scaling * m.lora_B.double() @ m.lora_A.double()  # (out, in)
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        assert torch.allclose(torch.tensor(entry.spectrum["singular_values"], dtype=torch.float64), s[:4], rtol=1e-9)
        w0 = w[entry.module + ".weight"].double().T  # Conv1D stores (in, out)
        amp = float(torch.linalg.matrix_norm(delta)) / float(torch.linalg.matrix_norm(u[:, :4].T @ w0 @ vh[:4].T))
        assert abs(entry.spectrum["amplification"] - amp) < 1e-6 * amp
        assert 1 <= entry.spectrum["effective_rank"] <= 4 and entry.spectrum["rank"] == 4
    assert info.params == sum(m.lora_A.numel() + m.lora_B.numel() for m in loaded.modules.values())


def test_inspect_wrong_base_and_cli_json(models_dir: Path, tmp_path: Path) -> None:
    adapter = make_adapter(models_dir / "llama", tmp_path / "a", target_modules=["q_proj"])
    info = inspect_adapter(adapter, models_dir / "gpt2")
    assert info.compatible is False and "another base" in str(info.incompatibility)
    assert "amplification" not in info.modules[0].spectrum
    r = CliRunner().invoke(main, ["inspect", str(adapter), "--base", str(models_dir / "llama"), "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["compatible"] and data["modules"][0]["module"] == "model.layers.0.self_attn.q_proj"
    text = CliRunner().invoke(main, ["inspect", str(adapter)])
    assert text.exit_code == 0 and "model.layers.1.self_attn.q_proj" in text.output

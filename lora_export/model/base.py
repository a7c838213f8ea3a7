"""A transformers model folder, read without instantiating the model: config, lazy tensors, module kinds, tied weights."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from ..io.errors import InputError, UnsafeInputError, UnsupportedError
from ..io.hashing import sha256_file
from ..io.jsonio import read_json_object
from ..io.paths import as_path, checked_link, safe_child
from ..io.tensorfiles import TensorStore
from .config import ModelConfig, text_part

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


@dataclass
class BaseModel:
    folder: Path
    config: dict[str, Any]
    store: TensorStore
    weight_files: list[Path]

    @classmethod
    def open(cls, folder: Path | str, allow_pickle: bool = False) -> BaseModel:
        folder = as_path(folder)
        if not folder.is_dir():
            raise InputError(f"base model folder {folder} does not exist")
        config = dict(ModelConfig.load(folder).data)
        if config.get("quantization_config"):
            method = config["quantization_config"].get("quant_method", "?")
            raise UnsupportedError(
                f"{folder / 'config.json'}: the base is quantized ({method}); merging into quantized weights rounds the "
                "delta away or is impossible (GPTQ). Merge into the unquantized base the adapter was trained from"
            )
        check_side_files(folder)
        files, store = open_weights(folder, allow_pickle)
        return cls(folder, config, store, files)

    def text_config(self) -> dict[str, Any]:
        return text_part(self.config)

    @property
    def tie_word_embeddings(self) -> bool:
        # transformers' default is True when the field is absent
        return bool(self.config.get("tie_word_embeddings", self.text_config().get("tie_word_embeddings", True)))

    def input_files(self) -> list[dict[str, Any]]:
        return [
            {"name": p.name, "sha256": sha256_file(p), "size": p.stat().st_size}
            for p in sorted(self.folder.iterdir())
            if p.is_file() and p not in self.weight_files
        ]

    @cached_property
    def meta_model(self) -> Any:
        """The model built on the meta device (no memory, no weights), for module classes and tied weights.

        None when transformers does not know the architecture: callers fall back to what shapes tell.
        """
        import torch
        import transformers

        archs = self.config.get("architectures") or []
        cls = getattr(transformers, archs[0], None) if archs else None
        if cls is None:
            return None
        try:
            config = transformers.AutoConfig.from_pretrained(self.folder, local_files_only=True)
            with torch.device("meta"):
                return cls(config)
        except Exception:  # an architecture that cannot be built here: shapes must do
            return None

    @cached_property
    def may_use_conv1d(self) -> bool:
        """False when transformers' modeling code for this model_type never mentions Conv1D.

        Reading the source text avoids importing transformers (seconds) for the common all-nn.Linear models.
        """
        if self.config.get("auto_map"):  # custom modeling code: only the built model can tell
            return True
        spec = importlib.util.find_spec("transformers")
        if spec is None or not spec.submodule_search_locations:
            return True
        folder = (
            Path(list(spec.submodule_search_locations)[0])
            / "models"
            / str(self.config.get("model_type", "")).replace("-", "_")
        )
        files = list(folder.glob("modeling_*.py"))
        return not files or any("Conv1D" in f.read_text(errors="replace") for f in files)

    def is_conv1d(self, path: str) -> bool | None:
        """Whether the module at `path` is transformers' Conv1D (weight stored in×out); None when unknown."""
        if not self.may_use_conv1d:
            return False
        cls = self.module_class(path)
        return None if cls is None else cls == "Conv1D"

    @cached_property
    def module_classes(self) -> dict[str, str] | None:
        model = self.meta_model
        return None if model is None else {name: type(m).__name__ for name, m in model.named_modules()}

    def module_class(self, path: str) -> str | None:
        classes = self.module_classes
        return None if classes is None else classes.get(path)

    def tied_aliases(self) -> dict[str, str]:
        """Weight names the checkpoint does not store because they are tied: {output name: stored name}."""
        if not self.tie_word_embeddings:
            return {}
        model = self.meta_model
        if model is None:
            return {}
        names = {id(m): n for n, m in model.named_modules()}
        inp, out = model.get_input_embeddings(), model.get_output_embeddings()
        if inp is None or out is None or id(inp) not in names or id(out) not in names:
            return {}
        src, dst = names[id(inp)] + ".weight", names[id(out)] + ".weight"
        if dst in self.store or src not in self.store:
            return {}
        return {dst: src}


def open_weights(folder: Path, allow_pickle: bool) -> tuple[list[Path], TensorStore]:
    index = folder / "model.safetensors.index.json"
    single = folder / "model.safetensors"
    if index.is_file():
        files, weight_map = read_index(index)
        store = TensorStore.open_safetensors(files)
        check_index_agrees(index, weight_map, store)
        return files, store
    if single.is_file():
        checked_link(folder, single, f"{folder}'s weights")
        return [single], TensorStore.open_safetensors([single])
    pickled = folder / "pytorch_model.bin"
    if pickled.is_file() or (folder / "pytorch_model.bin.index.json").is_file():
        if not allow_pickle:
            raise UnsafeInputError(
                f"{folder} holds pickled weights (pytorch_model.bin), which can run code when loaded: pass --allow-pickle "
                "to load them with torch.load(weights_only=True), or convert the model to safetensors"
            )
        if not pickled.is_file():
            raise UnsupportedError(f"{folder}: sharded pickles are not supported; convert the model to safetensors")
        return [pickled], TensorStore.open_pickle(pickled)
    raise InputError(f"{folder} has no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


SIDE_JSON = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
             "added_tokens.json")  # fmt: skip


def check_side_files(folder: Path) -> None:
    """The JSON files copied beside the merged weights and the graph parse, before any work: a damaged tokenizer
    would otherwise be shipped, and the checks would fall back to random tokens."""
    for name in SIDE_JSON:
        if (folder / name).is_file():
            read_json_object(folder / name, "", fix=f"; fix {name} or remove it from {folder} (it would be shipped)")


def check_index_agrees(index: Path, weight_map: dict[str, Any], store: TensorStore) -> None:
    """The index and the shards agree both ways: each tensor the index names is in the shard it names, and every
    tensor of the shards is in the index. Otherwise a merge would silently drop tensors or read another's."""
    problems = []
    for name, file in weight_map.items():
        info = store.infos.get(name)
        if info is None:
            problems.append(f"{name} is not in the shard the index puts it in ({file})")
        elif info.file.name != file:
            problems.append(f"{name} is in {info.file.name}, not in {file} as the index says")
    problems += [
        f"{name} (in {store.infos[name].file.name}) is not in the index"
        for name in store.infos
        if name not in weight_map
    ]
    named = set(weight_map.values())
    stray = [p.name for p in sorted(index.parent.glob("model-*.safetensors")) if p.name not in named]
    problems += [f"{name} holds weights the index does not name" for name in stray]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise InputError(
            f"{index}: the index and the shards disagree: {problems[0]}{more}; download or save the model again"
        )


def read_index(index: Path) -> tuple[list[Path], dict[str, Any]]:
    """The shard files an index names (each a checked plain file in its folder) and its weight map."""
    fix = ": download or save the model again"
    data = read_json_object(index, "the index names the model's shards", fix=f" (not a valid index){fix}")
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict):
        raise InputError(f"{index}: not a valid index (its weight_map is not an object){fix}")
    files: list[Path] = []
    for name in dict.fromkeys(weight_map.values()):
        path = safe_child(index.parent, str(name), str(index))
        if not path.is_file():
            raise InputError(
                f"{index} names the shard {name}, which is missing from {index.parent}: download the missing shard or save the model again"
            )
        files.append(path)
    return files, weight_map

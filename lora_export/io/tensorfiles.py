"""Safetensors IO: lazy reading by name and by row range (headers checked without mapping the file), streamed
sharded writing, and the re-read of every written shard.

Reads go through `os.preadv` into small buffers instead of a memory map, so a merge of a model larger than RAM keeps
only a few megabytes resident; the page cache is the kernel's business, not our RSS.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from .errors import CorruptFileError, InputError, UnsafeInputError
from .hashing import remember_written, sha256_file
from .jsonio import write_json

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_CODES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}
REFETCH = "; download or save the file again"
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: byte range [start, end) of `file`, absolute offsets."""

    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def row_bytes(self) -> int:
        rows = self.shape[0] if self.shape else 1
        return (self.end - self.start) // rows if rows else 0


def read_safetensors_header(path: Path) -> tuple[int, dict[str, Any]]:
    """Return (data start offset, header dict) of a safetensors file whose layout has been checked.

    The layout is checked here, without mapping the file (a process under a memory limit such as `ulimit -v` cannot
    map a file larger than the limit), then by safetensors' own parser as a second opinion when the file can be mapped.
    """
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CorruptFileError(
                    f"{path}: {size} bytes, too short to be a safetensors file (needs an 8-byte header length){REFETCH}"
                )
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > size - 8:
                raise CorruptFileError(
                    f"{path}: header length {header_len} is larger than the file ({size} bytes): truncated or not safetensors{REFETCH}"
                )
            if header_len > MAX_HEADER_BYTES:
                raise CorruptFileError(
                    f"{path}: header length {header_len} is over safetensors' limit of {MAX_HEADER_BYTES} bytes: not a safetensors file{REFETCH}"
                )
            header = json.loads(f.read(header_len))
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror or e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CorruptFileError(
            f"{path}: header is not valid JSON ({e}): the file is corrupt or not safetensors{REFETCH}"
        ) from None
    if not isinstance(header, dict):
        raise CorruptFileError(f"{path}: header is not a JSON object: the file is corrupt{REFETCH}")
    problem = layout_problem(header, size - 8 - header_len)
    if problem:
        raise CorruptFileError(f"{path}: {problem}{REFETCH}")
    try:
        with safe_open(str(path), framework="pt"):
            pass
    except Exception as e:  # safetensors raises its own SafetensorError; its text names the problem
        text = str(e).splitlines()[0] if str(e) else type(e).__name__
        if not isinstance(e, MemoryError) and "os error 12" not in text:  # ENOMEM: the map, not the file, failed
            raise CorruptFileError(f"{path}: safetensors rejects the file: {text}{REFETCH}") from None
    return 8 + header_len, header


def layout_problem(header: dict[str, Any], data_bytes: int) -> str | None:
    """What is wrong with a header's tensor table, as safetensors defines it: every entry a known dtype, a shape and
    [begin, end) offsets whose length is the shape's byte count; the ranges tile the data exactly, in order."""
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict):
            return f"tensor {name}: header entry is not an object"
        code, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(code, str) or code not in SAFETENSORS_DTYPES:
            return f"tensor {name} has dtype {code!r}, which this tool does not read (convert the file to float or integer tensors)"
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            return f"tensor {name}: shape {shape!r} is not a list of sizes"
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            return f"tensor {name}: data_offsets {offsets!r} are not [begin, end] with 0 ≤ begin ≤ end"
        need = math.prod(shape) * element_size(SAFETENSORS_DTYPES[code])
        if offsets[1] - offsets[0] != need:
            return f"tensor {name}: {code} {shape} needs {need} bytes but its offsets span {offsets[1] - offsets[0]}"
        spans.append((offsets[0], offsets[1], name))
    position, previous = 0, None
    for begin, end, name in sorted(spans):
        if begin < position:
            return f"tensors {previous} and {name} overlap (bytes {begin}–{position})"
        if begin > position:
            return f"a gap of {begin - position} bytes before tensor {name}: offsets do not tile the data"
        position, previous = end, name
    if position > data_bytes:
        return f"tensor {previous} ends at byte {position} of the data, but the file holds {data_bytes}: truncated"
    if position < data_bytes:
        return f"{data_bytes - position} bytes after the last tensor that no tensor claims: not what safetensors writes"
    return None


def scan_safetensors(path: Path) -> dict[str, TensorInfo]:
    data_start, header = read_safetensors_header(path)
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        begin, end = entry["data_offsets"]
        infos[name] = TensorInfo(
            name, path, SAFETENSORS_DTYPES[entry["dtype"]], tuple(entry["shape"]), data_start + begin, data_start + end
        )
    return infos


def parameter_count(folder: Path) -> int:
    """The tensors' elements in the folder's safetensors files, from their headers (0 for a folder without any)."""
    return sum(math.prod(i.shape) for f in folder.glob("*.safetensors") for i in scan_safetensors(f).values())


class TensorStore:
    """Tensors of one model or adapter, read lazily by name; safetensors files or (trusted) pickles."""

    def __init__(
        self, infos: Mapping[str, TensorInfo], files: list[Path], loaded: Mapping[str, torch.Tensor] | None = None
    ):
        self.infos = dict(infos)
        self.files = files
        self._loaded = dict(loaded or {})
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()

    @classmethod
    def open_safetensors(cls, files: list[Path]) -> TensorStore:
        infos: dict[str, TensorInfo] = {}
        for path in files:
            for name, info in scan_safetensors(path).items():
                if name in infos:
                    raise CorruptFileError(
                        f"{path}: tensor {name} is stored twice, also in {infos[name].file.name}: the shards do not belong together; download the model again"
                    )
                infos[name] = info
        return cls(infos, files)

    @classmethod
    def open_pickle(cls, path: Path) -> TensorStore:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise UnsafeInputError(
                f"{path}: torch.load(weights_only=True) refused the pickle ({type(e).__name__}: {str(e).splitlines()[0]}): "
                "it holds more than tensors; convert it to safetensors with code you trust"
            ) from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise InputError(f"{path}: expected a dict of tensors in the pickle, found {type(state).__name__}")
        infos = {
            k: TensorInfo(k, path, v.dtype, tuple(v.shape), 0, v.numel() * v.element_size()) for k, v in state.items()
        }
        return cls(infos, [path], loaded=state)

    def is_loaded(self, name: str) -> bool:
        return name in self._loaded

    def names(self) -> list[str]:
        return list(self.infos)

    def __contains__(self, name: object) -> bool:
        return name in self.infos

    def ordered(self) -> list[TensorInfo]:
        """Tensors in file order, so reading them in turn is one sequential pass over each file."""
        rank = {path: i for i, path in enumerate(self.files)}
        return sorted(self.infos.values(), key=lambda t: (rank[t.file], t.start))

    def _fd(self, path: Path) -> int:
        with self._lock:
            if path not in self._fds:
                self._fds[path] = os.open(path, os.O_RDONLY)
            return self._fds[path]

    def read_bytes(self, info: TensorInfo, start: int, end: int) -> torch.Tensor:
        """Bytes [start, end) of the file as a fresh uint8 tensor (no memory map, nothing kept)."""
        buf = torch.empty(end - start, dtype=torch.uint8)
        view = memoryview(buf.numpy())
        done = 0
        while done < len(view):
            n = os.preadv(self._fd(info.file), [view[done:]], start + done)
            if n == 0:
                raise CorruptFileError(
                    f"{info.file}: ends at byte {start + done}, but tensor {info.name} needs bytes up to {end}{REFETCH}"
                )
            done += n
        return buf

    def read_rows(self, name: str, row0: int, row1: int) -> torch.Tensor:
        """Rows [row0, row1) of a tensor (the whole tensor for scalars), as a fresh tensor."""
        info = self.infos[name]
        if name in self._loaded:
            t = self._loaded[name]
            return (t[row0:row1] if t.dim() else t).clone()
        if not info.shape:
            return self.read_bytes(info, info.start, info.end).view(info.dtype).reshape(())
        rb = info.row_bytes
        raw = self.read_bytes(info, info.start + row0 * rb, info.start + row1 * rb)
        return raw.view(info.dtype).reshape((row1 - row0, *info.shape[1:]))

    def read(self, name: str) -> torch.Tensor:
        info = self.infos[name]
        return self.read_rows(name, 0, info.shape[0] if info.shape else 1)

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * element_size(self.dtype)


@dataclass(frozen=True)
class WrittenFile:
    name: str
    sha256: str
    size: int


def plan_shards(specs: list[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Split tensors, in order, into shards of at most max_shard_bytes (a larger tensor gets a shard of its own)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def shard_file_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


class SafetensorsStreamWriter:
    """Writes one safetensors file whose tensors are known in advance, from pieces, in order, hashing as it goes."""

    def __init__(self, path: Path, specs: list[TensorSpec], metadata: Mapping[str, str] | None = None):
        self.path = path
        self.specs = specs
        header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        for spec in specs:
            header[spec.name] = {
                "dtype": DTYPE_CODES[spec.dtype],
                "shape": list(spec.shape),
                "data_offsets": [offset, offset + spec.nbytes],
            }
            offset += spec.nbytes
        self.data_bytes = offset
        blob = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
        blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned, as safetensors writes it
        self._f = path.open("wb")
        self._h = hashlib.sha256()
        self._written = 0
        self._put(struct.pack("<Q", len(blob)) + blob)
        self._header_bytes = 8 + len(blob)

    def _put(self, data: bytes | memoryview) -> None:
        self._f.write(data)
        self._h.update(data)

    def write(self, data: torch.Tensor | bytes) -> None:
        mv = (
            memoryview(data.contiguous().reshape(-1).view(torch.uint8).numpy())
            if isinstance(data, torch.Tensor)
            else memoryview(data)
        )
        if self._written + mv.nbytes > self.data_bytes:
            raise RuntimeError(f"{self.path}: more bytes written than planned")
        self._put(mv)
        self._written += mv.nbytes

    def close(self) -> WrittenFile:
        if self._written != self.data_bytes:
            raise RuntimeError(f"{self.path}: wrote {self._written} of {self.data_bytes} planned bytes")
        # No fsync: an interrupted run is caught by the atomic rename of the folder; durability against power loss
        # is the filesystem's (save_pretrained does not fsync either), and fsync costs more than the merge itself.
        self._f.close()
        written = WrittenFile(self.path.name, self._h.hexdigest(), self._header_bytes + self._written)
        remember_written(self.path, written.sha256)  # the report's file list does not read these bytes again
        return written

    def abort(self) -> None:
        self._f.close()


def write_index(folder: Path, shards: list[list[TensorSpec]], names: list[str]) -> None:
    weight_map = {spec.name: fname for shard, fname in zip(shards, names) for spec in shard}
    total = sum(spec.nbytes for shard in shards for spec in shard)
    write_json(folder / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})


def reread_shard(path: Path, shard: list[TensorSpec], wf: WrittenFile, rehash: bool = False) -> list[str]:
    """Re-read one written shard's header with safetensors' parser, check its size and, with `rehash`, hash it again
    from disk; return the disagreements. The re-hash mostly reads the page cache back, so it is opt-in."""
    found: list[str] = []
    try:
        _, header = read_safetensors_header(path)
    except InputError as e:
        return [f"{wf.name}: the written file does not parse on re-read: {str(e).removesuffix(REFETCH)}"]
    for spec in shard:
        entry = header.get(spec.name)
        if entry is None:
            found.append(f"{wf.name}: tensor {spec.name} missing on re-read")
        elif tuple(entry["shape"]) != spec.shape or entry["dtype"] != DTYPE_CODES[spec.dtype]:
            found.append(
                f"{wf.name}: {spec.name} re-read as {entry['dtype']} {entry['shape']}, wrote {spec.dtype} {spec.shape}"
            )
    if (size := path.stat().st_size) != wf.size:
        found.append(f"{wf.name}: {size} bytes on disk, wrote {wf.size}")
    elif rehash and (digest := sha256_file(path)) != wf.sha256:
        found.append(f"{wf.name}: sha256 on disk {digest[:16]}… differs from the bytes written {wf.sha256[:16]}…")
    return found

"""Hugging Face Hub addresses for bases and adapters: `org/name` or `org/name@revision` (a branch, tag or commit),
resolved through huggingface_hub — from the local cache first (HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE are read when a
command runs, not when this module is imported), downloading only what a base or an adapter needs when the network is
allowed. A path that exists always wins over an address.

What was resolved is recorded (`source_of`): the address as given, the repository, the revision asked for and the
commit it resolved to; the files' sha256 are recorded beside it by the records that already hash their inputs.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from ..io.errors import InputError
from ..records.source import HubSource

# What is downloaded of a base's or an adapter's repository: config, weights, tokenizer and chat template (not ONNX,
# GGUF, TF, Flax or pickled model copies; an adapter's adapter_model.bin is the exception: PEFT's older format).
PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "adapter_model.bin"]
NEEDS = {"base": ("config.json",), "adapter": ("adapter_config.json",), "any": ("config.json", "adapter_config.json")}
FALSE = ("", "0", "false", "no", "off")

_ADDRESS = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*(?:/[A-Za-z0-9][\w.-]*)?)(?:@(?P<revision>[^\s@]+))?")
_SNAPSHOT = re.compile(r"models--(?P<org>[^/]+?)(?:--(?P<name>[^/]+))?/snapshots/(?P<commit>[0-9a-f]{40})(?:/|$)")


class HubFolder(type(Path())):  # type: ignore[misc]  # PosixPath or WindowsPath
    """A folder in the Hugging Face cache with the address it was resolved from: resolving an address returns its
    source with it, so what is recorded never depends on which calls ran earlier. Paths derived from it (`/`,
    `resolve()`) are plain folders again: their source is read from the cache layout alone."""

    source: HubSource | None = None


def hub_folder(folder: Path, source: HubSource) -> HubFolder:
    out = HubFolder(folder)
    out.source = source
    return out


def parse_address(text: str) -> tuple[str, str | None] | None:
    """(repo, revision) when `text` is a Hub address, else None. Paths (./x, /x, ~/x, a/b/c) are never addresses."""
    if text.startswith((".", "/", "~")) or "\\" in text:
        return None
    m = _ADDRESS.fullmatch(text)
    if m is None:
        return None
    repo = m["repo"]
    if ".." in repo or "--" in repo or repo.endswith((".", "-")) or len(repo) > 96:
        return None  # huggingface_hub's repo-id rules
    return repo, m["revision"]


def cache_dir() -> Path:
    """The hub cache huggingface_hub would use, from the environment as it is now."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(name):
            return Path(os.environ[name]).expanduser()
    home = os.environ.get("HF_HOME")
    if not home:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        home = os.path.join(xdg, "huggingface")
    return Path(home).expanduser() / "hub"


def offline() -> bool:
    """HF_HUB_OFFLINE (or transformers' TRANSFORMERS_OFFLINE) set to anything but 0/false/no/off."""
    return bool(_offline_by())


def _offline_by() -> str:
    """The variable that puts us offline, or ""."""
    names = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    return next((n for n in names if os.environ.get(n, "").strip().lower() not in FALSE), "")


def resolve(text: str, kind: str = "base", log: Any = None) -> Path:
    """The local folder for a BASE or ADAPTER argument: the path when it exists, else the Hub address resolved through
    the cache (then the network, unless offline). Raises InputError naming what was tried and the fix."""
    from ..io.paths import probe

    path = probe(Path(text).expanduser(), f"the {kind}")
    return path if path.exists() else resolve_address(text, kind, log)


def folder_of(value: Path | str, kind: str = "base") -> Path:
    """A library argument as a folder: a Path as given (a HubFolder keeps its source), a string as `resolve` reads a
    command-line argument — the path when it exists, else a Hub address through the cache."""
    return value if isinstance(value, Path) else resolve(value, kind)


def resolve_address(text: str, kind: str = "base", log: Any = None) -> Path:
    """A Hub address `org/name[@revision]` resolved through the cache (then the network, unless offline), whatever
    folders exist; InputError naming what was tried and the fix."""
    address = parse_address(text)
    if address is None:
        raise InputError(f"{text}: no such folder (and not a Hub address org/name[@revision]); check the path")
    repo, revision = address
    cached = from_cache(repo, revision, kind)
    if cached is not None and not has_weights(cached) and offline():  # e.g. only config.json was ever fetched
        raise InputError(
            f"{text}: in the Hugging Face cache ({cached}) without its weights (only some of its files were "
            f"downloaded, and {_offline_by()} is set); download it with the network on (`{_fetch(repo, revision)}`) "
            "or give a folder"
        )
    folder = cached if cached is not None and has_weights(cached) else _download(text, repo, revision, kind, log)
    commit = _snapshot_commit(folder)
    return hub_folder(folder, HubSource(text, repo, revision, commit)) if commit else folder


def has_weights(folder: Path) -> bool:
    """Whether a model or adapter folder holds weights, not just its config."""
    if (folder / "adapter_config.json").is_file():
        return any((folder / f).is_file() for f in ("adapter_model.safetensors", "adapter_model.bin"))
    return any(folder.glob("*.safetensors")) or any(folder.glob("*.bin"))


def _fetch(repo: str, revision: str | None) -> str:
    return f"hf download {repo}" + (f" --revision {revision}" if revision else "")


def from_cache(repo: str, revision: str | None, kind: str) -> Path | None:
    """The cached snapshot of `repo` at `revision` (a branch, tag or commit; None: main) when it holds the file a
    `kind` ("base", "adapter", "any") needs; nothing is fetched."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(repo, revision=revision, cache_dir=cache_dir(), local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError):
        return None
    return folder if any((folder / f).is_file() for f in NEEDS[kind]) else None


def _download(text: str, repo: str, revision: str | None, kind: str, log: Any) -> Path:
    at = f" at revision {revision}" if revision else ""
    what, tried = f"{repo}{at}", f"no such folder, and not in the Hugging Face cache {cache_dir()}{at}"
    if offline():
        raise InputError(
            f"{text}: {tried} ({_offline_by()} is set, so nothing is downloaded); download it once with the network "
            f"on (`{_fetch(repo, revision)}`), point HF_HUB_CACHE at the cache that has it, or give a folder"
        )
    from huggingface_hub import snapshot_download

    if log:
        log(f"downloading {what} from the Hub into {cache_dir()} (weights, config, tokenizer) …")
    try:
        folder = Path(
            snapshot_download(
                repo,
                revision=revision,
                cache_dir=cache_dir(),
                allow_patterns=PATTERNS,
                endpoint=os.environ.get("HF_ENDPOINT") or None,
            )
        )
    except Exception as e:  # not found, gated, no network: one line with the reason
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(
            f"{text}: {tried}, and downloading it failed ({type(e).__name__}: {reason}); check the address and "
            "revision, log in (`hf auth login`) for a gated or private repository, or give a folder"
        ) from None
    if not any((folder / f).is_file() for f in NEEDS[kind]):
        raise InputError(f"{text}: the repository has no {' or '.join(NEEDS[kind])}: not a model or a PEFT adapter")
    return folder


def _snapshot_commit(folder: Path) -> str | None:
    m = _SNAPSHOT.search(folder.resolve().as_posix() + "/")
    return m["commit"] if m else None


def source_of(folder: Path | str) -> HubSource | None:
    """The Hub source of a folder: the one it was resolved with (a HubFolder), else read from its place in a Hugging
    Face cache (models--org--name/snapshots/COMMIT; the address as given is then the path, the revision unknown);
    None outside the cache."""
    if isinstance(folder, HubFolder) and folder.source is not None:
        return folder.source
    m = _SNAPSHOT.search(Path(folder).resolve().as_posix() + "/")
    if m is None:
        return None
    repo = f"{m['org']}/{m['name']}" if m["name"] else m["org"]
    return HubSource(str(folder), repo, None, m["commit"])


def sources(paths: list[Path | str]) -> dict[str, dict[str, Any]]:
    """{path: source} for the paths that came from the Hub cache (empty when none did)."""
    return {str(p): s.to_dict() for p in paths if (s := source_of(p)) is not None}


def source_field(folder: Path | str) -> dict[str, Any]:
    """{"source": …} for a record of a folder that came from the Hub cache, else {} (records stay as they were)."""
    source = source_of(folder)
    return {"source": source.to_dict()} if source else {}


def is_adapter(folder: Path) -> bool:
    return (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file()


def named_base(adapter: Path) -> str | None:
    """The base an adapter was trained on, as PEFT wrote it (adapter_config.json `base_model_name_or_path`)."""
    from .adapters import read_config  # the adapter's own checks, with their messages

    named = read_config(adapter).get("base_model_name_or_path")
    return named.strip() if isinstance(named, str) and named.strip() else None


def base_matches(base: Path, named: str) -> bool | None:
    """Whether `base` is the base an adapter names: the same folder (or a copy with the same config.json), the same
    Hub repository, or a folder named like it. None when the named base is a path that is not on this machine."""
    from ..io.paths import probe

    path = Path(named).expanduser()
    try:
        probe(path, "the named base")
    except InputError:  # a loop or a name this file system cannot hold: no such base here
        return None
    if path.is_dir():
        return path.resolve() == base.resolve() or _same_config(path, base)
    address = parse_address(named)
    if address is None or path.is_absolute():
        return None
    repo = address[0].lower()
    source = source_of(base)
    if source is not None:
        return source.repo.lower() == repo
    cached = from_cache(address[0], address[1], "base")  # the named base in the cache: a copy of it is it
    return (cached is not None and _same_config(cached, base)) or base.resolve().name.lower() == repo.split("/")[-1]


def _same_config(a: Path, b: Path) -> bool:
    """Two model folders with byte-identical config.json: copies of one base."""
    configs = [(f / "config.json").read_bytes() if (f / "config.json").is_file() else None for f in (a, b)]
    return configs[0] is not None and configs[0] == configs[1]


def describe(folder: Path) -> str:
    source = source_of(folder)
    return f"{source.repo}@{source.commit[:12]}" if source else str(folder)


def check_bases(base: Path, adapters: list[Path], strict: bool, warn: Any) -> None:
    """Each adapter against the base it names: a warning naming both when they differ (InputError with `strict`),
    a note when the named base is a path not on this machine."""
    for adapter in adapters:
        named = named_base(adapter)
        if named is None:
            continue
        same = base_matches(base, named)
        if same is None:
            warn(f"note: {adapter} names its base {named}, which is not on this machine: not compared with {base}")
        elif not same:
            told = f"{adapter} was trained on {named} (its adapter_config.json), but the base given is {describe(base)}"
            if strict:
                raise InputError(f"{told}; give that base, or leave out --strict-base to merge anyway")
            warn(f"warning: {told}; merging onto another base makes a model nobody trained (--strict-base refuses)")


def base_and_adapters(
    paths: list[Path], strict: bool = False, warn: Any = print, log: Any = None
) -> tuple[Path, list[Path]]:
    """[BASE] ADAPTER...: the base as given, or — when the first path is an adapter — the base its
    adapter_config.json names (a folder, or a Hub address resolved like any other); every adapter is then checked
    against it (check_bases)."""
    if not paths:
        raise InputError("give BASE and at least one ADAPTER")
    if is_adapter(paths[0]):
        named = named_base(paths[0])
        if named is None:
            raise InputError(
                f"{paths[0]}/adapter_config.json names no base (base_model_name_or_path): give BASE before the adapters"
            )
        try:
            base = resolve(named, "base", log)
        except InputError as e:
            raise InputError(
                f"{paths[0]} names its base {named}, which cannot be found: {e}; give BASE first"
            ) from None
        warn(f"base: {named} (named by {paths[0]}/adapter_config.json)")
        adapters = list(paths)
    else:
        base, adapters = paths[0], list(paths[1:])
    if not adapters:
        raise InputError(f"no ADAPTER after the base {base}: give at least one adapter folder or Hub address")
    check_bases(base, adapters, strict, warn)
    return base, adapters

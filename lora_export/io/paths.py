"""Paths taken from inputs: file names from index files, and links inside model folders, refused when they lead out
of the folder they belong to (a Hugging Face cache snapshot's links to its blobs excepted)."""

from __future__ import annotations

from pathlib import Path

from .errors import UnsafeInputError


def safe_child(folder: Path, name: str, what: str) -> Path:
    """Resolve a file name taken from an index file, refusing anything that leaves `folder`."""
    if not name or "/" in name or "\\" in name or name in (".", "..") or name.startswith(".."):
        raise UnsafeInputError(f"{what} names the file {name!r}: only plain file names inside {folder} are allowed")
    return checked_link(folder, folder / name, what)


def checked_link(folder: Path, path: Path, what: str) -> Path:
    """`path` (inside `folder`), refusing a symbolic link — at any depth — that leads out of the folder, and a loop.
    A Hugging Face cache snapshot links each file to ../../blobs/<hash>: that stays inside the cached repo."""
    try:
        target = path.resolve(strict=False)
    except (RuntimeError, OSError) as e:  # a loop
        raise UnsafeInputError(f"{what}: {path} is a symbolic link loop ({e}); replace it with the file") from None
    root = folder.resolve()
    if target == path.absolute() or target.is_relative_to(root):
        return path
    hf_blobs = root.parent.parent / "blobs" if root.parent.name == "snapshots" else None
    if hf_blobs and target.is_relative_to(hf_blobs):
        return path
    raise UnsafeInputError(
        f"{what}: {path.relative_to(folder) if path.is_relative_to(folder) else path} is a symbolic link out of "
        f"{folder} (to {target}): refusing to follow it; copy the file into the folder if you trust it"
    )


def as_path(value: Path | str) -> Path:
    """`value` as a Path, kept as given when it is one already: a folder resolved from a Hub address (model.hub's
    HubFolder) carries the address it came from, which `Path(value)` would drop."""
    return value if isinstance(value, Path) else Path(value)

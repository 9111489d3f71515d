"""Where a checkpoint name points: a local path or a Hugging Face hub id, decided in one place.

``is_hub_id("OFA-Sys/chinese-clip-vit-base-patch16")`` is True; a path that exists, starts with
``.``, ``/`` or ``~``, has more or fewer than one ``/``, or whose first part is a local directory
is a local path. ``resolve_local_or_hub(src)`` returns a local path, downloading hub ids (the one
download function); a local path that does not exist raises "no such local path".
"""

from __future__ import annotations

import os
import re

__all__ = ["is_hub_id", "hub_snapshot", "resolve_local_or_hub"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_id(src: str | os.PathLike) -> bool:
    """Whether ``src`` names a hub repo ("owner/name") rather than a local path."""
    if not isinstance(src, str):
        return False
    if os.path.exists(src) or not _HUB_ID.match(src):
        return False
    return not os.path.isdir(src.split("/")[0])  # "build/hf" with ./build present: a local path


def hub_snapshot(repo_id: str, allow_patterns: list[str] | None = None) -> str:
    """Downloads (or reuses the cached) files of a hub repo; returns the local snapshot directory."""
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo_id, allow_patterns=allow_patterns)
    except Exception as e:  # offline, no such repo or file: say which and why
        raise OSError(
            f"could not download {repo_id!r} from the hub ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
            "Offline? Download it elsewhere and pass the local directory."
        ) from None


def resolve_local_or_hub(src: str | os.PathLike, allow_patterns: list[str] | None = None) -> str:
    """A local path (which must exist) or a hub id (downloaded) -> a local path."""
    src = os.fspath(src)
    if os.path.exists(src):
        return src
    if is_hub_id(src):
        return hub_snapshot(src, allow_patterns)
    raise FileNotFoundError(f"no such local path: {src} (a hub id has the form 'owner/name')")

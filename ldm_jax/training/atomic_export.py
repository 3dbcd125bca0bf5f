"""Exports that are whole or absent: write a folder beside its destination, mark it complete,
then rename it into place; never export non-finite params.

``export_atomically(write, params, directory)`` runs ``write(params, tmp)`` into a temporary
sibling ``.<name>.tmp-<pid>-<id>``, writes the marker file ``EXPORT_COMPLETE`` last (after
every file was fsynced), then moves an older ``directory`` aside and renames the new one into
place, deleting the old one only afterwards. A process killed at any moment leaves either the
old export or the new one at ``directory`` (or, between the two renames, none; the new one
is complete in its temporary sibling) plus temporary siblings that the next export removes.

``export_complete(directory)`` says whether ``directory`` holds a finished export (its marker
is present and readable), so a finished run whose export is missing, partial, or written by
an older version without a marker can export again.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
import uuid
from typing import Any, Callable, Mapping

import jax
import numpy as np

log = logging.getLogger(__name__)

EXPORT_COMPLETE = "EXPORT_COMPLETE"


class ExportError(ValueError):
    """An export refused (non-finite params) or failed; one line."""


def first_non_finite(params: Any) -> str | None:
    """The name of the first leaf holding NaN/inf (``['unet']['conv_in']['kernel']``), or None."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        value = np.asarray(leaf)
        if np.issubdtype(value.dtype, np.inexact) or value.dtype.kind == "V" or "float" in str(value.dtype):
            if not np.all(np.isfinite(value.astype(np.float32))):
                return jax.tree_util.keystr(path)
    return None


def read_export_marker(directory: str | os.PathLike) -> dict | None:
    """The marker of a complete export (``{"completed": ..., **info}``), or None."""
    path = os.path.join(os.fspath(directory), EXPORT_COMPLETE)
    try:
        with open(path) as f:
            return dict(json.load(f))
    except (OSError, ValueError, TypeError):
        return None


def export_complete(directory: str | os.PathLike, **expected: Any) -> bool:
    """True when ``directory`` holds a finished export whose marker matches ``expected``
    (e.g. ``step=10000``: an export of another step counts as missing)."""
    marker = read_export_marker(directory)
    return marker is not None and all(marker.get(k) == v for k, v in expected.items())


def _fsync_tree(root: str) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(folder)


def _fsync_dir(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _siblings(directory: str) -> list[str]:
    parent, name = os.path.split(directory)
    prefixes = (f".{name}.tmp-", f".{name}.old-")
    return [os.path.join(parent, n) for n in os.listdir(parent) if n.startswith(prefixes)]


def export_atomically(
    write: Callable[[Any, str], None],
    params: Any,
    directory: str | os.PathLike,
    info: Mapping[str, Any] | None = None,
) -> str:
    """Export ``params`` with ``write(params, folder)`` so that ``directory`` is replaced only
    by a complete export. ``info`` (JSON-able, e.g. ``{"step": 10000}``) goes into the marker.
    Raises ExportError, writing nothing, when ``params`` hold non-finite values. Call on one
    process (the exporting one). Returns ``directory``."""
    directory = os.path.abspath(os.fspath(directory))
    bad = first_non_finite(params)
    if bad is not None:
        raise ExportError(f"refusing to export non-finite params: {bad} holds NaN/inf; {directory} left as it was")
    marker = {
        "completed": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **dict(info or {}),
    }
    marker_text = json.dumps(marker, indent=2, sort_keys=True)  # fail before writing anything
    parent, name = os.path.split(directory)
    os.makedirs(parent, exist_ok=True)
    for leftover in _siblings(directory):  # from an export that was killed
        shutil.rmtree(leftover, ignore_errors=True)
    tmp = os.path.join(parent, f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    try:
        write(params, tmp)
        with open(os.path.join(tmp, EXPORT_COMPLETE), "w") as f:
            f.write(marker_text)
        _fsync_tree(tmp)
        old = None
        if os.path.lexists(directory):
            old = os.path.join(parent, f".{name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            os.rename(directory, old)
        os.rename(tmp, directory)
        _fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if os.path.isdir(old) else os.remove(old)
    return directory

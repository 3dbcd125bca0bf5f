"""Atomic exports: the destination holds the old export or the new complete one, never a mix.

Truths: the files each writer was asked to write, and a writer killed mid-export (a
subprocess that exits with os._exit while writing) leaving the earlier export intact.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from ldm_jax.training.atomic_export import EXPORT_COMPLETE, ExportError, export_atomically, export_complete

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _writer(tag: str, fail_after: int | None = None):
    def write(params, folder):
        for i, (name, value) in enumerate(sorted(params.items())):
            if fail_after is not None and i == fail_after:
                raise OSError("disk full (simulated)")
            np.save(os.path.join(folder, f"{name}.npy"), value)
        with open(os.path.join(folder, "tag.txt"), "w") as f:
            f.write(tag)

    return write


PARAMS = {"a": np.ones((2, 3), np.float32), "b": np.arange(4, dtype=np.float32)}


def _tag(directory):
    return open(os.path.join(directory, "tag.txt")).read()


def test_export_writes_marker_last_and_replaces_older_export(tmp_path):
    model = tmp_path / "model"
    export_atomically(_writer("first"), PARAMS, model, {"step": 10})
    assert export_complete(model) and export_complete(model, step=10) and not export_complete(model, step=20)
    assert _tag(model) == "first"
    np.testing.assert_array_equal(np.load(model / "b.npy"), PARAMS["b"])
    export_atomically(_writer("second"), PARAMS, model, {"step": 20})
    assert _tag(model) == "second" and export_complete(model, step=20)
    assert sorted(os.listdir(tmp_path)) == ["model"]  # no temporary siblings left


def test_failed_export_leaves_previous_export_untouched(tmp_path):
    model = tmp_path / "model"
    export_atomically(_writer("good"), PARAMS, model, {"step": 10})
    with pytest.raises(OSError, match="disk full"):
        export_atomically(_writer("bad", fail_after=1), PARAMS, model, {"step": 20})
    assert _tag(model) == "good" and export_complete(model, step=10)
    assert sorted(os.listdir(tmp_path)) == ["model"]


def test_partial_or_unmarked_export_counts_as_missing_and_is_replaced(tmp_path):
    model = tmp_path / "model"
    os.makedirs(model)
    (model / "a.npy").write_bytes(b"\x93NUMPY half a file")  # e.g. written by an older version, then killed
    assert not export_complete(model)
    export_atomically(_writer("repaired"), PARAMS, model)
    assert export_complete(model) and _tag(model) == "repaired"
    np.testing.assert_array_equal(np.load(model / "a.npy"), PARAMS["a"])


def test_export_killed_midway_keeps_old_export_and_next_export_cleans_up(tmp_path):
    model = tmp_path / "model"
    export_atomically(_writer("old"), PARAMS, model, {"step": 10})
    script = textwrap.dedent("""
        import importlib.util, os, sys
        import numpy as np
        spec = importlib.util.spec_from_file_location("atomic_export", {path!r})
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        def write(params, folder):
            np.save(os.path.join(folder, "a.npy"), params["a"])
            os._exit(9)  # killed while writing
        module.export_atomically(write, {{"a": np.zeros(3, np.float32)}}, sys.argv[1], {{"step": 20}})
    """).format(path=os.path.join(ROOT, "ldm_jax", "training", "atomic_export.py"))
    proc = subprocess.run([sys.executable, "-c", script, str(model)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 9, proc.stderr[-2000:]
    assert _tag(model) == "old" and export_complete(model, step=10)
    leftovers = [n for n in os.listdir(tmp_path) if n != "model"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".model.tmp-")
    assert not os.path.exists(tmp_path / leftovers[0] / EXPORT_COMPLETE)
    export_atomically(_writer("new"), PARAMS, model, {"step": 20})
    assert sorted(os.listdir(tmp_path)) == ["model"] and _tag(model) == "new"


def test_non_finite_params_are_refused_in_one_line_and_nothing_is_written(tmp_path):
    model = tmp_path / "model"
    export_atomically(_writer("good"), PARAMS, model)
    bad = {"a": PARAMS["a"], "b": np.array([0.0, np.inf], np.float32), "c": {"k": np.array([np.nan], np.float16)}}
    with pytest.raises(ExportError) as info:
        export_atomically(_writer("bad"), bad, model)
    message = str(info.value)
    assert "\n" not in message and "refusing to export non-finite params: ['b'] holds NaN/inf" in message
    assert _tag(model) == "good" and sorted(os.listdir(tmp_path)) == ["model"]

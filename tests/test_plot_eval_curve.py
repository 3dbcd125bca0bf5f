"""scripts/plot_eval_curve.py on a synthetic ``eval_metrics.jsonl`` (the eval hook's format:
one JSON object per evaluation with ``step`` and the metrics).

Truths: the input records themselves (the table's rows, the curve's direction in the image) and
the PNG's own header (size). No JAX is imported.
"""

from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ACC, FD, REF = (31, 119, 180), (214, 39, 40), (90, 90, 90)


def _script():
    spec = importlib.util.spec_from_file_location("plot_eval_curve", os.path.join(ROOT, "scripts", "plot_eval_curve.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _records():
    steps = [500, 1000, 1500, 2000, 2500, 3000]
    acc = [0.41, 0.72, 0.88, 0.93, 0.962, 0.981]
    fd = [64.2, 9.31, 2.05, 0.91, 0.52, 0.333]
    return [{"step": s, "accuracy": a, "fd": f, "fd_real_vs_real": 0.153, "fd_ratio": f / 0.153, "num_samples": 500.0}
            for s, a, f in zip(steps, acc, fd)]


def _write(workdir, records, resumed=True):
    workdir.mkdir(exist_ok=True)
    lines = [json.dumps(r, sort_keys=True) for r in records]
    if resumed:  # a resumed run evaluates step 1500 again: the later record wins
        lines.insert(2, json.dumps(dict(records[2], accuracy=0.0, fd=999.0)))
        lines.append("")
    (workdir / "eval_metrics.jsonl").write_text("\n".join(lines) + "\n")
    return workdir


def _mask(pixels, color, tol=8):
    return np.all(np.abs(pixels.astype(int) - np.array(color)) <= tol, axis=-1)


def test_plot_writes_an_800x400_png_and_prints_the_rows_as_a_markdown_table(tmp_path, capsys):
    script = _script()
    records = _records()
    workdir = _write(tmp_path / "run", records)
    out = tmp_path / "docs" / "curve.png"
    assert script.main([str(workdir), "--out", str(out)]) == 0
    image = Image.open(out)
    assert image.format == "PNG" and image.size == (800, 400)

    lines = capsys.readouterr().out.splitlines()
    table = [line for line in lines if line.startswith("|")]
    header = [c.strip() for c in table[0].strip("|").split("|")]
    assert header == ["step", "accuracy", "fd", "fd_real_vs_real", "fd_ratio", "num_samples"]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table[2:]]
    assert len(rows) == len(records)
    for row, record in zip(rows, records, strict=True):
        assert int(row[0]) == record["step"]
        for cell, key in zip(row[1:], header[1:]):
            assert float(cell) == pytest.approx(record[key], rel=5e-4), (key, cell)

    pixels = np.asarray(image.convert("RGB"))
    left, right = pixels[:, :400], pixels[:, 400:]
    acc, fd = _mask(left, ACC), _mask(right, FD)
    assert acc.sum() > 200 and fd.sum() > 200 and not _mask(right, ACC).any() and not _mask(left, FD).any()

    def mean_row(mask, columns):
        rows, cols = np.nonzero(mask)
        keep = (cols >= columns.start) & (cols < columns.stop)
        return rows[keep].mean()

    acc_cols = np.nonzero(acc.any(axis=0))[0]
    fd_cols = np.nonzero(fd.any(axis=0))[0]
    # accuracy rises (drawn higher: smaller row) and FD falls over training
    assert mean_row(acc, range(acc_cols[0], acc_cols[0] + 10)) > mean_row(acc, range(acc_cols[-1] - 9, acc_cols[-1] + 1)) + 100
    assert mean_row(fd, range(fd_cols[0], fd_cols[0] + 10)) < mean_row(fd, range(fd_cols[-1] - 9, fd_cols[-1] + 1)) - 100
    # the real-vs-real level: a dashed horizontal line across the FD panel, below the last FD point
    ref_rows = np.nonzero(_mask(right, REF, tol=2).sum(axis=1) > 100)[0]
    assert len(ref_rows) >= 1
    assert ref_rows.min() > mean_row(fd, range(fd_cols[-1] - 3, fd_cols[-1] + 1))


def test_ticks_are_round_numbers_covering_the_data():
    script = _script()
    assert script.nice_ticks(0.0, 1.0) == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert script.nice_ticks(0, 3000) == pytest.approx([0, 1000, 2000, 3000])
    assert script.nice_ticks(0.31, 9.4) == pytest.approx([0, 2, 4, 6, 8, 10])
    assert script.log_ticks(0.153, 64.2) == pytest.approx([0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100])
    assert script.log_ticks(0.01, 5e3) == pytest.approx([0.01, 0.1, 1, 10, 100, 1e3, 1e4])


def test_plot_without_accuracy_draws_the_fd_panel_only(tmp_path, capsys):
    script = _script()
    records = [{k: v for k, v in r.items() if k != "accuracy"} for r in _records()]
    out = tmp_path / "fd.png"
    assert script.main([str(_write(tmp_path / "run", records, resumed=False) / "eval_metrics.jsonl"),
                        "--out", str(out), "--fd_scale", "linear"]) == 0
    pixels = np.asarray(Image.open(out).convert("RGB"))
    assert not _mask(pixels, ACC).any() and _mask(pixels[:, :400], FD).sum() > 100
    header = capsys.readouterr().out.splitlines()[0]
    assert header == "| step | fd | fd_real_vs_real | fd_ratio | num_samples |"


@pytest.mark.parametrize("content, message", [(None, "no evaluation metrics"), ("", "no evaluation records"),
                                              ('{"fd": 1.0}\n', ":1: not an evaluation record")])
def test_bad_metrics_files_fail_with_one_line(tmp_path, capsys, content, message):
    script = _script()
    workdir = tmp_path / "run"
    workdir.mkdir()
    if content is not None:
        (workdir / "eval_metrics.jsonl").write_text(content)
    assert script.main([str(workdir), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert not (tmp_path / "x.png").exists()

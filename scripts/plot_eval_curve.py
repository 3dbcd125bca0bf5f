#!/usr/bin/env python
"""Draw a training run's evaluation curve from ``<workdir>/eval_metrics.jsonl`` (written by
``ldm_jax.training.eval_hook``) and print its rows as a markdown table.

    python scripts/plot_eval_curve.py runs/demo/ldm --out docs/demo_eval_curve.png

Two panels against the training step: conditional ``accuracy`` (when the run logged it) and the
Frechet distance ``fd`` with the run's real-vs-real level ``fd_real_vs_real`` (and twice it,
the demo's target) as reference lines; runs scored with Inception plot ``fid`` instead. The FD
axis is logarithmic when the values span more than a factor of 20 (the first evaluations of a
run are often 100x the last). Pillow only (no matplotlib): a deliberate dependency choice,
so the figure is made with what ``make demo`` already installs. A resumed run may log a step
twice; the later record wins.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

METRICS_FILE = "eval_metrics.jsonl"  # ldm_jax.training.eval_hook.METRICS_FILE (not imported: no JAX here)
TABLE_KEYS = ("accuracy", "fd", "fd_real_vs_real", "fd_ratio", "fid", "is_mean", "num_samples")
COLORS = {"accuracy": (31, 119, 180), "fd": (214, 39, 40), "fid": (214, 39, 40),
          "ref": (90, 90, 90), "target": (160, 160, 160)}


class BadInput(ValueError):
    """A one-line problem with the command line or the metrics file."""


def read_records(path: str) -> list[dict]:
    """The evaluations of ``path`` (a workdir or a ``.jsonl`` file), one per step, by step."""
    if os.path.isdir(path):
        path = os.path.join(path, METRICS_FILE)
    if not os.path.isfile(path):
        raise BadInput(f"no evaluation metrics at {path} (is config.eval.every_steps > 0 for this run?)")
    by_step: dict[int, dict] = {}
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                step = int(record["step"])
            except (ValueError, KeyError, TypeError) as e:
                raise BadInput(f"{path}:{number}: not an evaluation record ({type(e).__name__}: {e})") from None
            by_step[step] = record
    if not by_step:
        raise BadInput(f"{path} holds no evaluation records")
    return [by_step[s] for s in sorted(by_step)]


def markdown_table(records: list[dict]) -> str:
    keys = [k for k in TABLE_KEYS if any(k in r for r in records)]

    def cell(record, key):
        value = record.get(key)
        if value is None:
            return ""
        return str(int(value)) if key == "num_samples" else f"{float(value):.4g}"

    lines = ["| step | " + " | ".join(keys) + " |", "|---:|" + "---:|" * len(keys)]
    lines += ["| " + " | ".join([str(r["step"])] + [cell(r, k) for k in keys]) + " |" for r in records]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- axes


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten apart) covering [lo, hi]."""
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(1, count)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.floor(lo / step + 1e-9) * step
    ticks, t = [], first
    while t <= hi + step * 1e-9:
        ticks.append(round(t, 12))
        t += step
    if ticks[-1] < hi - step * 1e-9:
        ticks.append(round(t, 12))
    return ticks


def log_ticks(lo: float, hi: float) -> list[float]:
    """1-2-5 ticks per decade covering [lo, hi] (lo > 0); whole decades only when that is too many."""
    lo_exp, hi_exp = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    mantissas = (1, 2, 5) if hi_exp - lo_exp <= 3 else (1,)
    ticks = [m * 10.0**e for e in range(lo_exp, hi_exp + 1) for m in mantissas]
    first = max(i for i, t in enumerate(ticks) if t <= lo * (1 + 1e-9))
    last = min(i for i, t in enumerate(ticks) if t >= hi * (1 - 1e-9))
    return ticks[first : last + 1]


def _label(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1e4 or abs(value) < 1e-3:
        return f"{value:.0e}"
    return f"{value:g}"


class Panel:
    """One plot area: data -> pixel transforms, axes, ticks, a title and a legend."""

    def __init__(self, draw, font, box, x_range, y_ticks, log_y, title, x_label):
        self.draw, self.font = draw, font
        self.left, self.top, self.right, self.bottom = box
        self.x_ticks = nice_ticks(*x_range, count=5)
        self.x0, self.x1 = self.x_ticks[0], self.x_ticks[-1]
        self.y_ticks, self.log_y = y_ticks, log_y
        self.y0, self.y1 = self._t(y_ticks[0]), self._t(y_ticks[-1])
        self.title, self.x_label = title, x_label

    def _t(self, y):
        return math.log10(y) if self.log_y else y

    def px(self, x, y):
        fx = (x - self.x0) / ((self.x1 - self.x0) or 1.0)
        fy = (self._t(y) - self.y0) / ((self.y1 - self.y0) or 1.0)
        return (self.left + fx * (self.right - self.left), self.bottom - fy * (self.bottom - self.top))

    def _text(self, xy, text, anchor, fill=(0, 0, 0)):
        self.draw.text(xy, text, fill=fill, font=self.font, anchor=anchor)

    def axes(self):
        d = self.draw
        d.rectangle((self.left, self.top, self.right, self.bottom), outline=(0, 0, 0), width=1)
        for x in self.x_ticks:
            px, _ = self.px(x, self.y_ticks[0])
            d.line((px, self.bottom, px, self.bottom + 5), fill=(0, 0, 0))
            d.line((px, self.top, px, self.bottom), fill=(235, 235, 235))
            self._text((px, self.bottom + 7), _label(x), "mt")
        for y in self.y_ticks:
            _, py = self.px(self.x0, y)
            d.line((self.left - 5, py, self.left, py), fill=(0, 0, 0))
            d.line((self.left + 1, py, self.right - 1, py), fill=(235, 235, 235))
            self._text((self.left - 8, py), _label(y), "rm")
        d.rectangle((self.left, self.top, self.right, self.bottom), outline=(0, 0, 0), width=1)
        self._text(((self.left + self.right) / 2, self.top - 10), self.title, "ms")
        self._text(((self.left + self.right) / 2, self.bottom + 26), self.x_label, "mt")

    def curve(self, xs, ys, color):
        points = [self.px(x, y) for x, y in zip(xs, ys)]
        if len(points) > 1:
            self.draw.line(points, fill=color, width=3, joint="curve")
        for px, py in points:
            self.draw.ellipse((px - 4, py - 4, px + 4, py + 4), fill=color)

    def hline(self, y, color, dash=8):
        _, py = self.px(self.x0, y)
        x = self.left + 1
        while x < self.right - 1:
            self.draw.line((x, py, min(x + dash, self.right - 1), py), fill=color, width=2)
            x += 2 * dash

    def legend(self, entries, corner="tr"):
        """``entries``: [(label, color, dashed)], boxed in a corner of the plot area."""
        widths = [self.draw.textlength(label, font=self.font) for label, _, _ in entries]
        width, height = max(widths) + 44, 20 * len(entries) + 8
        x = self.right - width - 8 if corner[1] == "r" else self.left + 8
        y = self.top + 8 if corner[0] == "t" else self.bottom - height - 8
        self.draw.rectangle((x, y, x + width, y + height), fill=(255, 255, 255), outline=(120, 120, 120))
        for i, (label, color, dashed) in enumerate(entries):
            cy = y + 14 + 20 * i
            if dashed:
                for sx in (x + 8, x + 22):
                    self.draw.line((sx, cy, sx + 8, cy), fill=color, width=2)
            else:
                self.draw.line((x + 8, cy, x + 30, cy), fill=color, width=3)
            self._text((x + 36, cy), label, "lm")


def _y_axis(values: list[float], scale: str) -> tuple[list[float], bool]:
    lo, hi = min(values), max(values)
    log_y = scale == "log" or (scale == "auto" and lo > 0 and hi / lo > 20)
    if log_y:
        if lo <= 0:
            raise BadInput(f"--fd_scale log needs positive values, got {lo}")
        return log_ticks(lo, hi), True
    return nice_ticks(min(0.0, lo), hi), False


def plot(records: list[dict], out: str, size: tuple[int, int] = (800, 400), fd_scale: str = "auto",
         accuracy_target: float = 0.98) -> str:
    """Write the figure (module docstring) to ``out``; ``accuracy_target`` > 0 draws that level
    on the accuracy panel (the demo's target, issue 13)."""
    from PIL import Image, ImageDraw, ImageFont

    width, height = size
    image = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=13)
    steps = [int(r["step"]) for r in records]
    x_range = (min(0, min(steps)), max(steps))
    panels = []
    if any("accuracy" in r for r in records):
        panels.append("accuracy")
    fd_key = "fd" if any("fd" in r for r in records) else "fid" if any("fid" in r for r in records) else None
    if fd_key:
        panels.append(fd_key)
    if not panels:
        raise BadInput("the records hold neither accuracy nor fd / fid")
    margin_left, margin_right, top, bottom = 62, 16, 30, height - 52
    slot = width / len(panels)
    for i, name in enumerate(panels):
        box = (i * slot + margin_left, top, (i + 1) * slot - margin_right, bottom)
        xs = [int(r["step"]) for r in records if name in r]
        ys = [float(r[name]) for r in records if name in r]
        if name == "accuracy":
            panel = Panel(draw, font, box, x_range, nice_ticks(0.0, 1.0), False, "conditional accuracy", "step")
            panel.axes()
            entries = [("accuracy of the samples", COLORS[name], False)]
            if accuracy_target > 0:
                panel.hline(accuracy_target, COLORS["target"], dash=4)
                entries.append((f"target ({accuracy_target:g})", COLORS["target"], True))
            panel.curve(xs, ys, COLORS[name])
            panel.legend(entries, corner="br")
            continue
        refs = sorted({float(r["fd_real_vs_real"]) for r in records if "fd_real_vs_real" in r})
        ref = refs[-1] if refs else None  # one value per run (the same real images every time)
        span = ys + ([ref, 2 * ref] if ref else [])
        ticks, log_y = _y_axis(span, fd_scale)
        title = "Frechet distance (log scale)" if log_y else "Frechet distance"
        panel = Panel(draw, font, box, x_range, ticks, log_y, title if name == "fd" else title.replace(
            "Frechet distance", "FID"), "step")
        panel.axes()
        entries = [(name, COLORS["fd"], False)]
        if ref:
            panel.hline(2 * ref, COLORS["target"], dash=4)
            panel.hline(ref, COLORS["ref"])
            entries += [(f"2x real-vs-real ({2 * ref:.3g})", COLORS["target"], True),
                        (f"real-vs-real ({ref:.3g})", COLORS["ref"], True)]
        panel.curve(xs, ys, COLORS["fd"])
        panel.legend(entries)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    image.save(out)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("workdir", help="a training workdir (or its eval_metrics.jsonl)")
    p.add_argument("--out", default="docs/demo_eval_curve.png")
    p.add_argument("--width", type=int, default=800)
    p.add_argument("--height", type=int, default=400)
    p.add_argument("--fd_scale", choices=("auto", "linear", "log"), default="auto")
    p.add_argument("--accuracy_target", type=float, default=0.98, help="a reference line on the accuracy panel (0: none)")
    args = p.parse_args(argv)
    try:
        if args.width < 300 or args.height < 200:
            raise BadInput(f"--width/--height must be at least 300x200, got {args.width}x{args.height}")
        records = read_records(args.workdir)
        plot(records, args.out, (args.width, args.height), args.fd_scale, args.accuracy_target)
    except BadInput as e:
        print(f"plot_eval_curve.py: {e}", file=sys.stderr)
        return 2
    print(markdown_table(records))
    print(f"\n(curve of {len(records)} evaluations written to {args.out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

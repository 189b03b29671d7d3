"""What a benchmark run prints and writes: tables (rich), the JSON record, and a PNG bar chart."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from backbones.fileio.atomic import atomic_write

from .models import COMPARISONS, MODES, ModelResult
from .timing import Spread, paired_ratio


@dataclass(frozen=True)
class Figure:
    """One headline number: a time ratio (target is a ceiling) or a throughput (target is a floor)."""

    key: str
    what: str
    value: Spread
    target: float | None = None
    at_least: bool = False  # True for throughputs: the target is the lowest acceptable value
    best: float | None = None  # for time ratios: fastest call / fastest call, robust to a busy machine

    @property
    def verdict(self) -> str:
        if self.target is None:
            return ""
        ok = self.value.median >= self.target if self.at_least else self.value.median <= self.target
        return "PASS" if ok else "MISS"

    def target_text(self) -> str:
        if self.target is None:
            return "-"
        return f"{'>=' if self.at_least else '<='} {self.target:g}"

    def as_dict(self) -> dict:
        return {
            "what": self.what,
            **self.value.as_dict(),
            "best": self.best,
            "target": self.target,
            "target_is_floor": self.at_least,
            "verdict": self.verdict or None,
        }


@dataclass(frozen=True)
class Row:
    """A timed item of a section table: seconds per call, and how many images one call handles."""

    name: str
    seconds: Spread
    images: int

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds.median

    def as_dict(self) -> dict:
        return {"name": self.name, "images": self.images, "images_per_s": self.images_per_s, **self.seconds.as_dict()}


@dataclass
class Section:
    """Detection or data results: rows, headline figures, or the reason the section was skipped."""

    title: str
    rows: list[Row] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    skipped: str | None = None
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "title": self.title,
            "skipped": self.skipped,
            "rows": [r.as_dict() for r in self.rows],
            "notes": self.notes,
        }


@dataclass(frozen=True)
class ModeStats:
    """One model in one mode: seconds per batch, and the throughputs derived from them (at the median)."""

    seconds: Spread
    images_per_s: float
    gflops: float
    percent_of_peak: float


def mode_stats(results: dict[str, ModelResult], batch_size: int, peak_gflops: float) -> dict[str, dict[str, ModeStats]]:
    """model key -> mode -> ModeStats, for the modes each model ran; the table, JSON and PNG all read these."""
    stats = {}
    for r in results.values():
        stats[r.key] = {}
        for mode, times in r.times.items():
            s = Spread.of(times)
            gflops = r.flops[mode] / s.median / 1e9
            stats[r.key][mode] = ModeStats(s, batch_size / s.median, gflops, 100 * gflops / peak_gflops)
    return stats


def ratio_figure(key: str, what: str, a: list[float], b: list[float], target: float | None = None) -> Figure:
    """Time ratio a / b: the median of per-round ratios (the verdict), and the ratio of the fastest calls.

    Other jobs only ever add time, so on a busy machine the fastest calls are the closest to the true cost.
    """
    return Figure(key, what, paired_ratio(a, b), target, best=min(a) / min(b))


def model_figures(results: dict[str, ModelResult]) -> list[Figure]:
    """The paired per-round time ratios of every comparison whose two models both ran."""
    figures = []
    for comp in COMPARISONS:
        a, b = results.get(comp.numerator), results.get(comp.denominator)
        if a is None or b is None:
            continue
        for mode in MODES:
            if mode in a.times and mode in b.times:
                key, what = f"{comp.key}_{mode}", f"{comp.what} ({mode})"
                figures.append(ratio_figure(key, what, a.times[mode], b.times[mode], comp.targets.get(mode)))
    return figures


def _ms(s: Spread) -> tuple[str, str]:
    return f"{s.median * 1e3:.1f}", f"{s.min * 1e3:.1f}-{s.max * 1e3:.1f}"


def model_table(results: dict[str, ModelResult], stats: dict[str, dict[str, ModeStats]], title: str) -> Table:
    table = Table(title=title)
    table.add_column("model")
    table.add_column("params", justify="right")
    for mode in MODES:
        table.add_column(f"{mode} ms", justify="right")
        table.add_column("min-max", justify="right")
        table.add_column("img/s", justify="right")
        table.add_column("GFLOP/s (%peak)", justify="right")
    for r in results.values():
        label = r.label if r.same_weights_as is None else f"{r.label} (= weights of {r.same_weights_as})"
        cells = [label, f"{r.params / 1e6:.2f}M"]
        for mode in MODES:
            m = stats[r.key].get(mode)
            if m is None:
                cells += ["-"] * 4
                continue
            cells += [*_ms(m.seconds), f"{m.images_per_s:.1f}", f"{m.gflops:.1f} ({m.percent_of_peak:.0f}%)"]
        table.add_row(*cells)
    return table


def section_table(section: Section) -> Table:
    table = Table(title=section.title)
    table.add_column("pipeline")
    table.add_column("ms / call", justify="right")
    table.add_column("min-max", justify="right")
    table.add_column("images / call", justify="right")
    table.add_column("images/s", justify="right")
    for row in section.rows:
        table.add_row(row.name, *_ms(row.seconds), str(row.images), f"{row.images_per_s:.1f}")
    return table


def figure_table(figures: list[Figure]) -> Table:
    table = Table(
        title="Figures: time ratios (below 1 the first is faster; median of per-round ratios, and the ratio of "
        "the fastest calls) and targets"
    )
    for name in ("figure", "median", "min-max", "best-of", "target", ""):
        table.add_column(name, justify="left" if name == "figure" else "right")
    for f in figures:
        verdict = {"PASS": "[green]PASS[/]", "MISS": "[red]MISS[/]"}.get(f.verdict, "")
        fmt = "{:.0f}" if f.at_least else "{:.3f}"  # throughputs in whole images/s, ratios to 0.1%
        spread = f"{fmt.format(f.value.min)}-{fmt.format(f.value.max)}"
        best = "-" if f.best is None else fmt.format(f.best)
        table.add_row(f"{f.key}: {f.what}", fmt.format(f.value.median), spread, best, f.target_text(), verdict)
    return table


def print_report(
    console: Console,
    results: dict[str, ModelResult],
    stats: dict[str, dict[str, ModeStats]],
    sections: list[Section],
    figures: list[Figure],
    *,
    title: str,
) -> None:
    if results:
        console.print(model_table(results, stats, title))
    for section in sections:
        if section.skipped:
            console.print(f"[yellow]{section.title}: skipped: {section.skipped}[/]")
            continue
        console.print(section_table(section))
        for note in section.notes:
            console.print(f"  {note}")
    console.print(figure_table(figures))


def to_json(
    settings: dict,
    results: dict[str, ModelResult],
    stats: dict[str, dict[str, ModeStats]],
    sections: list[Section],
    figures: list[Figure],
    peak: dict,
) -> dict:
    """The JSON record: every figure's median at the top level (e.g. `se_overhead_infer`), then the details."""
    models = {}
    for r in results.values():
        entry = {"label": r.label, "params": r.params, "flops_per_batch": r.flops, "same_weights_as": r.same_weights_as}
        for mode, m in stats[r.key].items():
            entry[mode] = {
                **{f"{k}_s": v for k, v in m.seconds.as_dict().items()},
                "images_per_s": m.images_per_s,
                "gflops": m.gflops,
                "percent_of_peak": m.percent_of_peak,
                "times_s": r.times[mode],
            }
        models[r.key] = entry
    return {
        **{f.key: f.value.median for f in figures},
        "figures": {f.key: f.as_dict() for f in figures},
        "settings": settings,
        "peak": peak,
        "models": models,
        "sections": [s.as_dict() for s in sections],
    }


def write_json(path: Path, record: dict) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(record, f, indent=2, allow_nan=False)
            f.write("\n")

    atomic_write(path, write)


def write_png(
    path: Path,
    results: dict[str, ModelResult],
    stats: dict[str, dict[str, ModeStats]],
    figures: list[Figure],
    title: str = "",
) -> None:
    """Two panels: images/s of every model in each mode, and every time ratio with its target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5.5), gridspec_kw={"width_ratios": [1, 1.2]})
    labels = [r.label for r in results.values()]
    width = 0.4
    for i, mode in enumerate(MODES):
        values = [stats[r.key][mode].images_per_s if mode in stats[r.key] else 0.0 for r in results.values()]
        left.barh([y + (i - 0.5) * width for y in range(len(labels))], values, height=width, label=mode)
    left.set_yticks(range(len(labels)), labels)
    left.invert_yaxis()
    left.set_xlabel("images / s (higher is better)")
    left.legend()
    left.set_title("Throughput")

    figures = [f for f in figures if not f.at_least]  # ratios only: throughputs live on another scale
    keys = [f.key for f in figures]
    medians = [f.value.median for f in figures]
    errors = [[f.value.median - f.value.min for f in figures], [f.value.max - f.value.median for f in figures]]
    colors = ["tab:green" if f.verdict == "PASS" else "tab:red" if f.verdict == "MISS" else "tab:gray" for f in figures]
    right.barh(range(len(keys)), medians, xerr=errors, color=colors, capsize=3)
    best = [(y, f.best) for y, f in enumerate(figures) if f.best is not None]
    if best:
        right.scatter([b for _, b in best], [y for y, _ in best], marker="x", color="black", zorder=3, label="best-of")
        right.legend(loc="lower right")
    for y, f in enumerate(figures):
        if f.target is not None:
            right.plot([f.target, f.target], [y - 0.4, y + 0.4], color="black", linewidth=2)
    right.axvline(1.0, color="gray", linewidth=0.8, linestyle="--")
    right.set_yticks(range(len(keys)), keys)
    right.invert_yaxis()
    right.set_title("Time ratios (bar: median, whiskers: min-max, x: best-of, tick: target)")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()

    def write(tmp):
        fig.savefig(tmp, format="png", dpi=100)

    try:
        atomic_write(path, write)
    finally:
        plt.close(fig)

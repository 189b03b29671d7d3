"""The paper's Section 7.2 on a trained classifier: excitation per class (Fig. 6 and 7) and SE-block pruning.

For every chosen SE block (default: the paper's, the last of each stage and all of the last stage) the mean
excitation of each channel over the images of a class, drawn for 50 evenly spread channels: Fig. 6 puts
several classes and all images together; Fig. 7 one class's mean with its standard deviation. The paper reads
from them that early blocks excite class-agnostically, later ones class-specifically, and that the last stage's
blocks are near-saturated (most values close to 1), hence the pruning experiment: the SE blocks of chosen
stages replaced by the identity, error and parameter count beside the full model's (SE-ResNet-50: <0.1% more
top-5 error without stage 5's SE blocks, whose parameters are ~6 of SE's ~10% increase over ResNet-50).

tools/excitation.py is the command line; the data is the training run's own validation set (the checkpoint's
DataModule hyperparameters), the synthetic one for the smoke checkpoints.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from backbones import CheckpointError
from backbones.analysis import (
    ExcitationRecorder,
    ExcitationStats,
    count_parameters,
    sampled_channels,
    se_blocks,
    se_parameters,
    select_blocks,
    stage_of,
    without_se,
)
from backbones.fileio.atomic import atomic_write

from .inference import Classifier, load_classifier, run_name
from .samples import DataError


def batches(classifier: Classifier, limit: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(normalised images, labels) of the training run's validation set, on the model's device, as the
    trainers' evaluation sees them (one centre crop); the first `limit` images only, if given."""
    dm = classifier.datamodule(**({"ten_crop": False} if "ten_crop" in (classifier.data or {}) else {}))
    device = next(classifier.model.parameters()).device
    seen = 0
    for batch in dm.val_dataloader():
        batch = dm.on_before_batch_transfer(batch, 0)
        images, labels = dm.on_after_batch_transfer([t.to(device) for t in batch], 0)
        if limit is not None:
            images, labels = images[: limit - seen], labels[: limit - seen]
        yield images, labels
        seen += len(labels)
        if limit is not None and seen >= limit:
            return


@torch.no_grad()
def errors(model: nn.Module, data: Iterable[tuple[torch.Tensor, torch.Tensor]], recorder=None) -> tuple[float, float]:
    """(top-1, top-5 error in %) of `model` over `data`; `recorder.add(labels)` after every batch if given."""
    right1 = right5 = n = 0
    for images, labels in data:
        logits = model(images)
        if recorder is not None:
            recorder.add(labels)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        right1 += (top[:, 0] == labels).sum().item()
        right5 += (top == labels[:, None]).any(1).sum().item()
        n += len(labels)
    if n == 0:
        raise DataError("the validation set holds no images")
    return 100 * (1 - right1 / n), 100 * (1 - right5 / n)


@dataclass
class PruningRow:
    """One variant of the pruning table: which SE blocks are the identity, its size and errors."""

    variant: str
    removed: list[str]
    parameters: int
    increase: float  # parameters over the network without any SE block, in %
    top1: float
    top5: float


def pruning_table(
    model: nn.Module,
    variants: dict[str, list[str]],
    data,
    full: tuple[float, float],
) -> list[PruningRow]:
    """The full model (its errors `full`) and each variant {name: SE blocks removed}, evaluated on `data()`."""
    total = count_parameters(model)
    plain = total - se_parameters(model)
    rows = [PruningRow("full", [], total, 100 * (total - plain) / plain, *full)]
    for name, removed in variants.items():
        params = total - se_parameters(model, removed)
        rows.append(
            PruningRow(
                name, removed, params, 100 * (params - plain) / plain, *errors(without_se(model, removed), data())
            )
        )
    return rows


def default_variants(names: Sequence[str]) -> dict[str, list[str]]:
    """Each stage's SE blocks removed on their own, then all of them."""
    stages = sorted({stage_of(n) for n in names})
    variants = {f"no SE_{s}": [n for n in names if stage_of(n) == s] for s in stages}
    if len(stages) > 1:
        variants["no SE"] = list(names)
    return variants


def parse_variant(text: str, names: Sequence[str]) -> tuple[str, list[str]]:
    """ "5" or "4,5" (stages) or "SE_5_2,SE_5_3" (blocks) -> (label, blocks)."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    blocks = select_blocks(names, items)
    label = "no " + " ".join(f"SE_{i}" if i.isdigit() else i for i in items)
    return label, blocks


def pick_classes(stats: ExcitationStats, class_names: list[str], wanted: Sequence[str] | None, count: int = 4):
    """Class indices for the figures: `wanted` (names or indices), else `count` spread over the classes seen."""
    if wanted:
        index = {n: i for i, n in enumerate(class_names)}
        picks = []
        for w in wanted:
            i = int(w) if w.isdigit() else index.get(w)
            if i is None or not 0 <= i < len(class_names):
                raise DataError(f"no class {w!r} (e.g. {', '.join(class_names[:3])})")
            if stats.counts[i] == 0:
                raise DataError(f"class {class_names[i]!r} has no images in the data")
            picks.append(i)
        return picks
    seen = np.flatnonzero(stats.counts)
    return [int(seen[j]) for j in np.unique(np.linspace(0, len(seen) - 1, min(count, len(seen))).round().astype(int))]


def _grid(n: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), squeeze=False, sharey=True)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, axes.flat


def figure_classes(stats: ExcitationStats, classes: list[int], class_names: list[str], path: str | Path) -> None:
    """Fig. 6: per block, the mean excitation of 50 channels for each class in `classes` and for all images."""
    fig, axes = _grid(len(stats.blocks))
    for ax, block in zip(axes, stats.blocks, strict=False):
        ch = sampled_channels(stats.all_mean[block].shape[0])
        for c in classes:
            ax.plot(ch, stats.mean[block][c, ch], lw=1, label=class_names[c])
        ax.plot(ch, stats.all_mean[block][ch], "k--", lw=1.2, label="all")
        ax.set_title(block, fontsize=10)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("channel index", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0].set_ylabel("mean excitation", fontsize=8)
    axes[0].legend(fontsize=7, loc="lower left")
    _save(fig, path)


def figure_spread(stats: ExcitationStats, cls: int, class_names: list[str], path: str | Path) -> None:
    """Fig. 7: per block, the mean excitation of 50 channels over one class's images, with +- 1 std."""
    fig, axes = _grid(len(stats.blocks))
    for ax, block in zip(axes, stats.blocks, strict=False):
        ch = sampled_channels(stats.all_mean[block].shape[0])
        mean, std = stats.mean[block][cls, ch], stats.std[block][cls, ch]
        ax.fill_between(ch, mean - std, mean + std, alpha=0.3, lw=0)
        ax.plot(ch, mean, lw=1)
        ax.set_title(f"{block}: {class_names[cls]} ({int(stats.counts[cls])} images)", fontsize=10)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("channel index", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0].set_ylabel("excitation, mean +- std", fontsize=8)
    _save(fig, path)


def figure_table(rows: list[PruningRow], path: str | Path, title: str = "") -> None:
    """The pruning table as a picture."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    header, cells = _table_cells(rows)
    fig, ax = plt.subplots(figsize=(6, 0.3 * (len(rows) + 1) + 0.4))
    ax.axis("off")
    table = ax.table(cellText=cells, colLabels=header, loc="center", cellLoc="right", colLoc="right")
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    table.scale(1, 1.4)
    table.auto_set_column_width(list(range(len(header))))
    if title:
        ax.set_title(title, fontsize=10)
    _save(fig, path)


def _table_cells(rows: list[PruningRow]) -> tuple[list[str], list[list[str]]]:
    full = rows[0]
    header = ["variant", "parameters", "+params vs no SE", "top-1 err", "top-5 err", "Δ top-1", "Δ top-5"]
    cells = [
        [
            r.variant,
            f"{r.parameters:,}",
            f"{r.increase:.2f}%",
            f"{r.top1:.2f}%",
            f"{r.top5:.2f}%",
            f"{r.top1 - full.top1:+.2f}",
            f"{r.top5 - full.top5:+.2f}",
        ]
        for r in rows
    ]
    return header, cells


def _save(fig, path: str | Path) -> None:
    import matplotlib.pyplot as plt

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=90, bbox_inches="tight"))
    plt.close(fig)


def write_outputs(out: Path, stats: ExcitationStats, rows: list[PruningRow]) -> None:
    """excitation.npz (every block's per-class mean / std, all images', counts) and pruning.csv."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "excitation.npz", lambda tmp: _savez(tmp, stats.arrays()))
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["variant", "removed", "parameters", "increase_percent", "top1_error", "top5_error"])
    for r in rows:
        writer.writerow(
            [r.variant, " ".join(r.removed), r.parameters, f"{r.increase:.4f}", f"{r.top1:.4f}", f"{r.top5:.4f}"]
        )
    atomic_write(out / "pruning.csv", lambda tmp: tmp.write_text(text.getvalue()))


def _savez(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as f:  # a file object: given a name, np.savez would append ".npz" to it
        np.savez(f, **arrays)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a trainer's Lightning .ckpt (its validation data is read)")
    parser.add_argument("--blocks", nargs="+", help="SE blocks (SE_5_2) or stages (5) to draw; default the paper's")
    parser.add_argument("--classes", nargs="+", help="class names or indices for Fig. 6 (the first: Fig. 7)")
    parser.add_argument(
        "--prune",
        action="append",
        metavar="STAGES",
        help="SE blocks to replace by the identity: "
        "stages '5', '4,5' or blocks 'SE_5_2'; repeatable (default: each stage, then all)",
    )
    parser.add_argument("--limit", type=int, help="use only the first N validation images")
    parser.add_argument("--out", default="output/excitation", help="folder for the figures, NPZ and CSV")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> tuple[ExcitationStats, list[PruningRow]]:
    args = parse_args(argv)
    from rich.console import Console
    from rich.table import Table

    console = Console()
    out = Path(args.out)
    try:
        classifier = load_classifier(args.checkpoint, device=args.device)
        model, names = classifier.model, list(se_blocks(classifier.model))
        if not names:
            raise DataError(f"{args.checkpoint}: {type(model).__name__} has no SE blocks to analyse")
        blocks = select_blocks(names, args.blocks)
        with ExcitationRecorder(model, blocks, len(classifier.class_names)) as recorder:
            full = errors(model, batches(classifier, args.limit), recorder)
        stats = recorder.stats()
        variants = dict(parse_variant(v, names) for v in args.prune) if args.prune else default_variants(names)
        rows = pruning_table(model, variants, lambda: batches(classifier, args.limit), full)
        classes = pick_classes(stats, classifier.class_names, args.classes)
    except (DataError, CheckpointError, OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    figure_classes(stats, classes, classifier.class_names, out / "excitation_fig6.png")
    figure_spread(stats, classes[0], classifier.class_names, out / "excitation_fig7.png")
    title = f"{run_name(args.checkpoint)}: {int(stats.counts.sum())} validation images"
    figure_table(rows, out / "pruning.png", title)
    write_outputs(out, stats, rows)

    summary = Table(title="excitation (mean over all images)")
    for column in ("block", "channels", "mean", "min channel", "max channel", "mean within-class std"):
        summary.add_column(column, justify="right" if column != "block" else "left")
    for b in blocks:
        m = stats.all_mean[b]
        summary.add_row(
            b, str(len(m)), f"{m.mean():.3f}", f"{m.min():.3f}", f"{m.max():.3f}", f"{np.nanmean(stats.std[b]):.3f}"
        )
    console.print(summary)
    header, cells = _table_cells(rows)
    pruning = Table(title=title)
    for column in header:
        pruning.add_column(column, justify="left" if column == "variant" else "right")
    for row in cells:
        pruning.add_row(*row)
    console.print(pruning)
    console.print(f"wrote {out}/: excitation_fig6.png, excitation_fig7.png, pruning.png, excitation.npz, pruning.csv")
    return stats, rows

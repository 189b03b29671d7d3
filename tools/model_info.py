"""Print parameters and GMACs of registered models, ablation options, or the paper's ablation tables.

python tools/model_info.py                               # every registered model
python tools/model_info.py se_resnet50 --set style=caffe --set se_reduction=8
python tools/model_info.py --table 10 --table 13         # the paper's tables next to ours
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backbones import create_model, list_models  # noqa: E402
from backbones.ablations import PAPER_TABLES  # noqa: E402
from backbones.complexity import count_macs, count_params, default_input_size  # noqa: E402


def _parse_set(items: list[str]) -> dict:
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        overrides[key] = yaml.safe_load(value)
    return overrides


def _measure(name: str, overrides: dict) -> tuple[int, int, tuple[int, int, int]]:
    """Parameters, MACs and the (C, H, W) input they were counted on."""
    model = create_model(name, **overrides)
    size = default_input_size(name)
    return count_params(model), count_macs(model, size), size


def _fmt(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", help="registered names (default: all)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="model option override")
    parser.add_argument("--table", action="append", default=[], choices=sorted(PAPER_TABLES), help="paper table")
    args = parser.parse_args(argv)
    if args.set and args.table and not args.models:
        parser.error("--set applies to the models listed, not to the --table rows")
    console = Console()

    if args.table:
        for key in args.table:
            title, rows = PAPER_TABLES[key]
            table = Table(title=f"{title} (SE-ResNet-50, Caffe style, no FC biases)")
            for col in ("variant", "params (M)", "paper params (M)", "GMACs", "paper GFLOPs", "paper top-1/top-5"):
                table.add_column(col, justify="left" if col == "variant" else "right")
            for row in rows:
                params, macs, _ = _measure(row.model, row.overrides)
                err = "-" if row.paper_top1_top5 is None else "{:.2f} / {:.2f}".format(*row.paper_top1_top5)
                table.add_row(
                    row.label, _fmt(params / 1e6, 2), _fmt(row.paper_params_m, 1), _fmt(macs / 1e9, 3),
                    _fmt(row.paper_gflops, 2), err,
                )  # fmt: skip
            console.print(table)
        if not args.models:
            return

    overrides = _parse_set(args.set)
    table = Table(title="Registered models" + (f" with {overrides}" if overrides else ""))
    for col in ("model", "params", "GMACs", "input"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for name in args.models or list_models():
        params, macs, size = _measure(name, overrides)
        table.add_row(name, f"{params:,}", f"{macs / 1e9:.3f}", "x".join(map(str, size[1:])))
    console.print(table)


if __name__ == "__main__":
    main()

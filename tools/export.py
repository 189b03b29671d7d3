"""Export a registered model or a checkpoint to TorchScript (.pt) or ONNX (.onnx), checked against PyTorch.

python tools/export.py se_resnet50 se_resnet50.onnx                           # random weights
python tools/export.py se_resnet50 se_resnet50.pt --set style=caffe --method trace
python tools/export.py --checkpoint se_resnet50.safetensors se_resnet50.onnx  # model name from the record
python tools/export.py se_resnet50 --checkpoint SENet.pth.tar out.onnx --exporter torchscript

The written file is loaded back and run on a random input next to PyTorch; the max abs difference is printed,
and above --tolerance the tool exits with an error and writes nothing. Logic: `backbones.exporters.export_model`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backbones import create_model, create_pretrained  # noqa: E402
from backbones.complexity import default_input_size  # noqa: E402
from backbones.exporters import (  # noqa: E402
    FORMATS,
    ONNX_EXPORTERS,
    TORCHSCRIPT_METHODS,
    ExportMismatchError,
    export_model,
)
from tools.model_info import _parse_set  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", help="registered name (default with --checkpoint: the recorded one)")
    parser.add_argument("output", type=Path, help=f"output file: {', '.join(FORMATS)}")
    parser.add_argument("--checkpoint", help="weights to load (any file or URL backbones.create_pretrained reads)")
    parser.add_argument("--trusted", action="store_true", help="allow arbitrary unpickling: only for trusted files")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="model option override")
    parser.add_argument("--method", choices=TORCHSCRIPT_METHODS, default="script", help="TorchScript: how")
    parser.add_argument("--exporter", choices=ONNX_EXPORTERS, default="dynamo", help="ONNX: which exporter")
    parser.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")
    parser.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"), help="default 224 (CIFAR 32)")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="largest max abs difference accepted (times the largest |output| if above 1)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.model is None and args.checkpoint is None:
        parser.error("give a model name, a --checkpoint, or both")
    if args.output.suffix not in FORMATS:
        parser.error(f"{args.output}: the output suffix must be one of {', '.join(FORMATS)}")

    overrides = _parse_set(args.set)
    try:
        if args.checkpoint is None:
            model = create_model(args.model, **overrides)
        else:
            model = create_pretrained(args.model, args.checkpoint, trusted=args.trusted, **overrides)
    except ValueError as err:  # unknown model or option, unreadable or mismatched checkpoint
        parser.error(str(err))
    name = model.model_cfg.name
    size = tuple(args.input_size or default_input_size(name)[1:])
    try:
        diff = export_model(
            model,
            args.output,
            input_size=(model.conv1.in_channels, *size),
            method=args.method,
            exporter=args.exporter,
            opset=args.opset,
            tolerance=args.tolerance,
        )
    except ExportMismatchError as err:
        raise SystemExit(f"error: {err}") from None
    how = args.method if args.output.suffix == ".pt" else f"{args.exporter} exporter"
    print(f"wrote {args.output} ({name}, {FORMATS[args.output.suffix]} by {how}, input {'x'.join(map(str, size))})")
    print(f"max abs difference from PyTorch: {diff:.3g}")


if __name__ == "__main__":
    main()

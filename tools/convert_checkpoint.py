"""Convert an ImageNet checkpoint of any supported project into ours (safetensors + JSON) or detectron2 (.pkl).

    python tools/convert_checkpoint.py se_resnet50-ce0d4300.pth se_resnet50.safetensors --arch se_resnet50
    python tools/convert_checkpoint.py se_resnet50.safetensors se_resnet50_d2.pkl      # arch from the record

The model is configured as the weights need (Caffe-style geometry, SE width rounding, class count); `--set`
adds or overrides constructor options. All logic lives in `backbones.factory.convert_checkpoint`.
"""

from __future__ import annotations

import argparse
import ast
import logging
import sys
from typing import Any

from backbones.checkpoints.export import CHECKPOINT_FORMATS, DETECTRON2_PREFIX
from backbones.checkpoints.formats import SCHEMES, SCHEMES_DOC
from backbones.factory import convert_checkpoint


def _option(text: str) -> tuple[str, Any]:
    """KEY=VALUE with VALUE a Python literal (1, (1, 1, 1, 1), False) or else a plain string (caffe)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="checkpoint file or URL (.pth/.pt/.bin/.ckpt/.tar, .safetensors, .pkl)")
    p.add_argument("dst", help="output: NAME.safetensors (ours, + NAME.json) or NAME.pkl (detectron2)")
    p.add_argument("--arch", help="registered model name (default: the one recorded in our own checkpoints)")
    schemes = "; ".join(f"{name}: {doc}" for name, doc in SCHEMES_DOC.items())
    p.add_argument("--from", dest="from_format", choices=SCHEMES, metavar="SCHEME",
                   help=f"key scheme of SRC (default: detected). {schemes}")  # fmt: skip
    p.add_argument("--to", choices=CHECKPOINT_FORMATS, help="output format (default: from the DST suffix)")
    p.add_argument("--trusted", action="store_true", help="allow arbitrary unpickling: only for trusted files")
    p.add_argument("--ema", action="store_true", help="take the EMA weights (state_dict_ema, model_ema, ...)")
    p.add_argument("--prefix", help="take the weights under this key prefix when several candidates tie")
    p.add_argument("--allow-nonfinite", action="store_true", help="convert weights holding NaN or inf (refused)")
    p.add_argument("--set", dest="options", action="append", type=_option, default=[], metavar="KEY=VALUE",
                   help="model option, e.g. --set layers='(1,1,1,1)' --set style=caffe (repeatable)")  # fmt: skip
    p.add_argument("--mean", type=float, nargs="+", help="per-channel mean of [0, 1] pixels (default ImageNet)")
    p.add_argument("--std", type=float, nargs="+", help="per-channel std of [0, 1] pixels (default ImageNet)")
    p.add_argument("--channel-order", choices=("RGB", "BGR"), help="input channel order (default RGB)")
    p.add_argument("--input-size", type=int, nargs=3, metavar=("C", "H", "W"), help="default 3 224 224")
    p.add_argument("--detectron2-prefix", default=DETECTRON2_PREFIX, help="key prefix in the detectron2 file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    given = {"mean": args.mean, "std": args.std, "channel_order": args.channel_order, "input_size": args.input_size}
    try:
        report = convert_checkpoint(
            args.src,
            args.dst,
            arch=args.arch,
            from_format=args.from_format,
            to=args.to,
            trusted=args.trusted,
            ema=args.ema,
            prefix=args.prefix,
            allow_nonfinite=args.allow_nonfinite,
            options=dict(args.options),
            preprocessing={k: v for k, v in given.items() if v is not None},
            detectron2_prefix=args.detectron2_prefix,
        )
    # CheckpointError is a ValueError; OSError covers an unwritable destination and an unreadable source
    except (ValueError, TypeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.dst} ({len(report.loaded)} tensors, {report.format} names)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

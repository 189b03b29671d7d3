r"""Run one of detectron2's own tools on this project's YAML configs.

    python tools/d2_tool.py analyze_model --tasks flop -n 10 --config-file configs/detectron2/faster_rcnn_se_r50.yaml \
        MODEL.WEIGHTS output/faster_rcnn_se_r50/model_final.pth
    python tools/d2_tool.py analyze_model --tasks parameter --config-file configs/detectron2/faster_rcnn_se_r50.yaml
    python tools/d2_tool.py DETECTRON2_REPO/tools/deploy/export_model.py --export-method tracing --format torchscript \
        --config-file configs/detectron2/faster_rcnn_se_r50.yaml --output output/export \
        MODEL.WEIGHTS output/faster_rcnn_se_r50/model_final.pth MODEL.DEVICE cpu

The first argument names the tool: the path of a detectron2 tool script, or the name of one that detectron2's
installation ships (pip installs its tools/ folder: analyze_model, benchmark, visualize_data, ...). The rest is
that tool's own command line. The tool runs with MODEL.SENET in its config, the backbone builders registered,
MODEL.WEIGHTS read as tools/train_net.py reads it (our ImageNet checkpoints too) and FLOP counts that include the
SE blocks' squeeze and scale (detection/detectron2/tools.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0 if argv else 2)
    from detection.detectron2.tools import find_tool, run_tool  # registers the backbones and datasets

    try:
        find_tool(argv[0])
    except FileNotFoundError as e:
        sys.exit(f"error: {e}")
    run_tool(argv[0], argv[1:])


if __name__ == "__main__":
    main()

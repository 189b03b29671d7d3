"""Faster R-CNN with (SE-)ResNet backbones on Detectron2: train, then evaluate on COCO with pycocotools.

    python tools/train_net.py --config configs/faster_rcnn_se_r50.yaml --num-gpus 8
    python tools/train_net.py --config configs/faster_rcnn_se_r50.yaml --eval-only MODEL.WEIGHTS model_final.pth
    python tools/train_net.py            # the synthetic smoke run, on CPU in minutes

Detectron2's options: --config-file (alias --config), --num-gpus, --num-machines, --machine-rank, --dist-url,
--eval-only, --resume, and trailing KEY VALUE config overrides. Metrics land in OUTPUT_DIR/coco_metrics.json.
"""

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing the packages

SMOKE_CONFIG = REPO / "configs/detectron2/smoke/faster_rcnn_se_r50_synthetic.yaml"
INSTALL = "pip install --no-build-isolation 'git+https://github.com/facebookresearch/detectron2.git'"


def main() -> int:
    try:
        from detectron2.engine import default_argument_parser, launch
    except ImportError as e:
        print(f"tools/train_net.py needs Detectron2 ({e}); install torch first, then: {INSTALL}", file=sys.stderr)
        return 2
    from torch.multiprocessing import ProcessRaisedException

    from backbones import CheckpointError
    from detection.detectron2.data import DatasetLayoutError
    from detection.detectron2.engine import check
    from detection.detectron2.engine import main as train_and_evaluate

    parser = default_argument_parser()
    parser.add_argument("--config", dest="config_file", metavar="FILE", help="alias of --config-file")
    args = parser.parse_args()
    if not args.config_file:
        args.config_file = str(SMOKE_CONFIG)
        print(f"no --config given: running the synthetic smoke config {SMOKE_CONFIG.relative_to(REPO)}")
    ours = (CheckpointError, DatasetLayoutError)
    try:
        cfg = check(args)  # here, not only in the workers: an error raised in a spawned worker is a traceback wall
        if cfg.MODEL.DEVICE == "cpu" and args.num_gpus * args.num_machines > 1:
            # launch picks NCCL and one GPU per worker whenever CUDA is available; CPU workers need gloo, which
            # it picks when the (spawned) workers see no GPU
            os.environ["CUDA_VISIBLE_DEVICES"] = ""
        launch(
            train_and_evaluate,
            args.num_gpus,
            num_machines=args.num_machines,
            machine_rank=args.machine_rank,
            dist_url=args.dist_url,
            args=(args,),
        )
    except ours as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ProcessRaisedException as e:
        # a worker's error arrives as its formatted traceback; ours (a detector checkpoint that does not fit the
        # model, found once the workers have built it) is said as in one process, the rest stays a traceback
        text = str(e)
        mark = next((m for m in (f"{c.__module__}.{c.__qualname__}: " for c in ours) if m in text), None)
        if mark is None:
            raise
        print(f"error: {text.split(mark, 1)[1].strip()}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

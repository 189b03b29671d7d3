"""Train and evaluate an MMDetection config (Faster R-CNN with our SE-ResNet) with MMEngine's Runner.

    python tools/train_mmdet.py configs/mmdet/smoke/faster-rcnn_se-r50_fpn_synthetic.py   # CPU, minutes
    python tools/train_mmdet.py configs/mmdet/faster-rcnn_se-r50_fpn_2x_coco.py --auto-scale-lr
    torchrun --nproc_per_node 8 tools/train_mmdet.py CONFIG --launcher pytorch      # 8 GPUs x 2 = 16 images
    torchrun --standalone --nproc-per-node 2 tools/train_mmdet.py CONFIG --launcher pytorch   # no GPU: 2 CPU processes
    python tools/train_mmdet.py CONFIG --resume                 # continue from work_dir's latest checkpoint
    python tools/train_mmdet.py CONFIG --eval-only --checkpoint output/mmdet/NAME/epoch_24.pth

Metrics (COCO box AP via pycocotools) go to the log and to WORK_DIR/metrics.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detection.mmdet import runner as mmdet_runner  # noqa: E402  (needs neither mmcv nor mmdet to import)

# mmengine 0.10 imports pkg_resources; its deprecation notice says nothing to a user of this tool.
warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="MMDetection config file, e.g. configs/mmdet/faster-rcnn_se-r50_fpn_2x_coco.py")
    parser.add_argument("--work-dir", help="where logs, checkpoints and metrics.json go (default output/mmdet/NAME)")
    parser.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="CKPT",
        help="resume training: from CKPT, or without it from the latest checkpoint in the work dir",
    )
    parser.add_argument("--eval-only", action="store_true", help="only evaluate the test set (needs --checkpoint)")
    parser.add_argument(
        "--checkpoint", help="detector weights to evaluate (--eval-only) or to start training from (not with --resume)"
    )
    parser.add_argument(
        "--auto-scale-lr",
        action="store_true",
        help="scale lr linearly by total batch / auto_scale_lr.base_batch_size (16 in the Table 7 configs)",
    )
    parser.add_argument(
        "--launcher",
        choices=["none", "pytorch", "slurm", "mpi"],
        default="none",
        help="'pytorch' under torchrun for many GPUs / machines",
    )
    parser.add_argument(
        "--cfg-options",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override config keys, e.g. model.backbone.style=caffe train_dataloader.batch_size=4",
    )
    parser.add_argument("--local-rank", "--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not Path(args.config).is_file():
        parser.error(f"config file {args.config} does not exist")
    if args.eval_only and not args.checkpoint:
        parser.error("--eval-only needs --checkpoint PATH (a detector checkpoint, e.g. WORK_DIR/epoch_24.pth)")
    if args.resume and args.checkpoint:  # MMEngine would resume from --checkpoint, whatever --resume says
        parser.error(
            "--resume and --checkpoint name two starting points: --resume [CKPT] continues a run (weights, "
            "optimizer, schedule), --checkpoint PATH starts a new one from detector weights; pass one"
        )
    if args.launcher == "pytorch" and not {"RANK", "WORLD_SIZE", "MASTER_ADDR"} <= os.environ.keys():
        parser.error(
            "--launcher pytorch runs in processes started by torchrun, which sets RANK, WORLD_SIZE and MASTER_ADDR: "
            "torchrun --nproc-per-node N tools/train_mmdet.py CONFIG --launcher pytorch (one process: leave "
            "--launcher out)"
        )
    os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    return args


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    mmdet_runner.check_mmdet()
    # a missing, truncated or code-running file: one line here, not the Runner's traceback after the model is built
    if isinstance(args.resume, str):
        mmdet_runner.check_checkpoint(args.resume, "--resume")
    if args.checkpoint:
        mmdet_runner.check_checkpoint(args.checkpoint, "--checkpoint")
    cfg = mmdet_runner.load_config(
        args.config,
        cfg_options=mmdet_runner.parse_cfg_options(args.cfg_options),
        work_dir=args.work_dir,
        launcher=args.launcher,
        resume=args.resume,
        load_from=args.checkpoint,
        auto_scale_lr=args.auto_scale_lr,
    )
    return mmdet_runner.run(cfg, eval_only=args.eval_only)


if __name__ == "__main__":
    mmdet_runner.main_guard(main)

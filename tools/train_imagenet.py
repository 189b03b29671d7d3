"""ImageNet pre-training (the paper's Section 5.1 recipe) with the Places365 image pipeline.

    python tools/train_imagenet.py fit --config configs/imagenet_se_resnet50.yaml --data.root DIR
    python tools/train_imagenet.py fit --config configs/imagenet_se_resnet50.yaml --ckpt_path last

Checkpoints (`<default_root_dir>/checkpoints/last.ckpt`) load into the detection configs and Places365
fine-tuning through `backbones.load_pretrained`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from places365.cli import imagenet_cli  # noqa: E402

if __name__ == "__main__":
    imagenet_cli()

"""ImageNet pre-training (the paper's Section 5.1 recipe) with the image-file pipeline Places365 uses too.

    C=configs/lightning/imagenet
    I="--config $C/recipe_section5.yaml --config $C/imagenet_se_resnet50.yaml"
    python tools/train_imagenet.py fit $I --data.root DIR
    python tools/train_imagenet.py fit $I --ckpt_path last

Checkpoints (`<default_root_dir>/checkpoints/last.ckpt`) load into the detection configs and Places365
fine-tuning through `backbones.load_pretrained`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from classification import ImageNetDataModule  # noqa: E402
from classification.cli import main  # noqa: E402

if __name__ == "__main__":
    main(ImageNetDataModule)

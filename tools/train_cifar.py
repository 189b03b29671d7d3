"""Train / validate / test the CIFAR networks of Tables 4-5 with LightningCLI: a recipe config, then a model config.

C=configs/lightning/cifar
python tools/train_cifar.py fit --config $C/recipe_resnet_he.yaml --config $C/cifar10_se_resnet110.yaml --data.root DIR
python tools/train_cifar.py test --config $C/recipe_resnet_he.yaml --config $C/cifar10_se_resnet110.yaml \
    --data.root DIR --ckpt_path last
python tools/train_cifar.py fit --config configs/lightning/smoke/cifar10_synthetic.yaml   # CPU, a few minutes
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from cifar.data import CIFARDataModule  # noqa: E402
from cifar.files import CIFARFormatError  # noqa: E402
from classification.cli import main  # noqa: E402

if __name__ == "__main__":
    main(CIFARDataModule, CIFARFormatError)

"""Train / validate / test the CIFAR networks of Tables 4-5 with LightningCLI.

python tools/train_cifar.py fit --config configs/cifar10_se_resnet110.yaml --data.root datasets
python tools/train_cifar.py test --config configs/cifar10_se_resnet110.yaml --ckpt_path last
python tools/train_cifar.py fit --config configs/smoke/cifar10_synthetic.yaml   # CPU, a few minutes
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from cifar.data import CIFARDataModule  # noqa: E402
from classification.cli import run_cli  # noqa: E402

if __name__ == "__main__":
    run_cli(CIFARDataModule)

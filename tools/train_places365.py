"""Train or evaluate on Places365 (Table 6 of the paper) with the shared classification LightningCLI.

    python tools/train_places365.py fit --config configs/places365_se_resnet152.yaml --data.root DIR
    python tools/train_places365.py fit --config configs/places365_se_resnet152.yaml --ckpt_path last
    python tools/train_places365.py validate --config configs/places365_se_resnet152.yaml --ckpt_path BEST.ckpt
    python tools/train_places365.py fit --config configs/smoke/places365_synthetic.yaml    # CPU, minutes

`--data.root DIR` names the release folder (lists + image folders, or the easyformat train/ and val/).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from places365.cli import places365_cli  # noqa: E402

if __name__ == "__main__":
    places365_cli()

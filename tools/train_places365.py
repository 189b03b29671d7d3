"""Train or evaluate on Places365 (Table 6 of the paper) with the shared classification LightningCLI.

    C=configs/lightning/places365
    P="--config $C/recipe_table6.yaml --config $C/places365_se_resnet152.yaml"
    python tools/train_places365.py fit $P --data.root DIR
    python tools/train_places365.py fit $P --ckpt_path last
    python tools/train_places365.py validate $P --ckpt_path BEST.ckpt
    python tools/train_places365.py fit --config configs/lightning/smoke/places365_synthetic.yaml    # CPU, minutes

`--data.root DIR` names the release folder (lists + image folders, or the easyformat train/ and val/).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from classification.cli import main  # noqa: E402
from places365 import Places365DataModule  # noqa: E402

if __name__ == "__main__":
    main(Places365DataModule)

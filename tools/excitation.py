"""The SENet paper's excitation analysis (Section 7.2) on a trained classifier: Fig. 6 (mean excitation per
channel, per class, at the chosen SE blocks), Fig. 7 (one class's mean and spread), the numbers (NPZ), and the
pruning experiment (SE blocks of chosen stages replaced by the identity: error and parameters beside the full
model's), over the training run's own validation set.

    python tools/excitation.py output/smoke/cifar10_synthetic/checkpoints/last.ckpt --out docs/images
    python tools/excitation.py RUN/checkpoints/best.ckpt --blocks SE_2_3 SE_3_4 SE_4_6 SE_5_1 SE_5_2 SE_5_3 \
        --classes goldfish pug --prune 5 --prune 4,5 --limit 10000

SE blocks are named as in the paper, SE_<stage>_<block>: stages 2..5 are layer1..layer4 (2..4 for the CIFAR
networks), blocks count from 1.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import cifar  # noqa: E402, F401  (the trainers' DataModules: the classes a checkpoint may name)
import places365  # noqa: E402, F401
from classification.excitation import main  # noqa: E402

if __name__ == "__main__":
    main()

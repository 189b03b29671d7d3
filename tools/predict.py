"""Classify images with a trained checkpoint: top-k class names and probabilities (a table; CSV / JSON on request),
the Places365 indoor/outdoor vote (--io) and class activation maps (--cam), with the training's own preprocessing.

    python tools/predict.py output/smoke/cifar10_synthetic/checkpoints/last.ckpt            # 8 val images
    python tools/predict.py output/smoke/places365_synthetic/checkpoints/last.ckpt \
        datasets/places365_synthetic/val_256 --io places365/IO_places365.txt --cam output/cam \
        --csv output/predictions.csv
    python tools/predict.py se_resnet50.safetensors photo.jpg --labels imagenet_classes.txt

Checkpoints: a trainer's Lightning .ckpt (network, preprocessing and class names from its hyperparameters), our
safetensors + JSON (its recorded preprocessing), or any file backbones loads (with --model NAME).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import cifar  # noqa: E402, F401  (the trainers' DataModules: the classes a checkpoint may name)
import places365  # noqa: E402, F401
from classification.predict import main  # noqa: E402

if __name__ == "__main__":
    main()

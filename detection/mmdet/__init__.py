"""MMDetection engine: `backbone` registers `type="SEResNet"` in `mmdet.registry.MODELS` and allow-lists MMEngine's
checkpoint classes for torch's weights-only loading when imported (configs do it with `custom_imports =
dict(imports=["detection.mmdet.backbone"], allow_failed_imports=False)`, so mmdet's own tools and APIs work on our
configs); `runner` is what tools/train_mmdet.py runs, and imports mmdet only once it has checked that it is usable."""

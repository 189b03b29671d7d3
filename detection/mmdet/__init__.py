"""MMDetection engine: `backbone` registers `type="SEResNet"` in `mmdet.registry.MODELS` when imported (configs
do it with `custom_imports = dict(imports=["detection.mmdet.backbone"], allow_failed_imports=False)`); `runner`
is what tools/train_mmdet.py runs, and imports mmdet only once it has checked that it is usable."""

"""Draw a trained detector's boxes, class names and scores on images, with either engine's own visualiser.

    python tools/demo_detection.py --engine detectron2 configs/detectron2/smoke/faster_rcnn_se_r50_synthetic.yaml \
        output/smoke_faster_rcnn_se_r50_synthetic/model_final.pth            # 4 synthetic val images
    python tools/demo_detection.py --engine mmdet configs/mmdet/smoke/faster-rcnn_se-r50_fpn_synthetic.py \
        output/mmdet/faster-rcnn_se-r50_fpn_synthetic/iter_300.pth photos/ --out output/demo
    python tools/demo_detection.py --engine detectron2 configs/detectron2/faster_rcnn_se_r50.yaml model_final.pth \
        street.jpg --score-threshold 0.7 --opts MODEL.DEVICE cuda

Writes `<out>/<image name>.png` per image (or `--out FILE.png` for one image) and prints what was found.
"""

import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

# mmengine 0.10 imports pkg_resources; its deprecation notice says nothing to a user of this tool
warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
# DetInferencer's visualiser asks for a save_dir it never needs here: the demo writes its own pictures
warnings.filterwarnings(
    "ignore", message="Failed to add <class 'mmengine.visualization.vis_backend", category=UserWarning
)

from detection.demo import main  # noqa: E402

if __name__ == "__main__":
    main()

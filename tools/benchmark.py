"""Speed of our SE-ResNet-50 / ResNet-50 against each other and the peers, interleaved in one process.

    python tools/benchmark.py --quick                          # about a minute on a 2-core CPU
    python tools/benchmark.py --json out/bench.json --png out/bench.png
    python tools/benchmark.py --device cuda --dtype bf16 --channels-last --batch-size 64

Ratios are time ratios (below 1: the first is faster): se_overhead_* = ours SE-R50 / ours R50,
vs_timm_* = ours SE-R50 / timm seresnet50, vs_torchvision_* = ours R50 / torchvision resnet50.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.cli import main  # noqa: E402

if __name__ == "__main__":
    main()

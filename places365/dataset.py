"""The map-style dataset shared by Places365 and ImageNet.

A bad sample (missing file, corrupt or truncated image) raises DataError naming the file and the list line.
With `skip_bad`, item i whose image cannot be loaded is replaced by the next loadable sample (i+1, i+2, ...)
and carries the message of its own failure: batches keep their size (no empty batch, no rank of a DDP run
waiting for another), and the main process counts exactly one message per bad sample however many
DataLoader workers loaded them.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from .lists import DataError, SampleTable
from .transforms import read_image


class ImageSampleDataset(Dataset):
    """Sample i -> (image, label) with image (3, S, S), or (10, 3, S, S) for ten-crop evaluation.

    With `skip_bad`, items are (image, label, bad) where `bad` is "" or the message of sample i's failure.
    More than `max_consecutive_bad` unloadable samples in a row raise DataError: that is a wrong image
    folder, not a few bad files.
    """

    def __init__(
        self,
        samples: SampleTable,
        transform: Callable[[np.ndarray], torch.Tensor],
        *,
        skip_bad: bool = False,
        max_consecutive_bad: int = 64,
    ):
        self.samples = samples
        self.transform = transform
        self.skip_bad = skip_bad
        self.max_consecutive_bad = max_consecutive_bad

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[torch.Tensor, int]:
        """(image tensor, label) of sample `index`; DataError naming the file and its list line on failure."""
        sample = self.samples[index]
        try:
            image = read_image(sample.path)
        except FileNotFoundError:
            reason = "file not found"
        except (OSError, ValueError) as e:
            reason = str(e)
        else:
            return self.transform(image), sample.label
        raise DataError(f"{sample.path}: {reason} (listed in {sample.origin})")

    def __getitem__(self, index: int):
        if not self.skip_bad:
            return self.load(index)
        bad = ""
        for step in range(self.max_consecutive_bad + 1):
            try:
                image, label = self.load((index + step) % len(self))
            except DataError as e:
                bad = bad or str(e)  # report sample `index` only: the others report themselves
                last = e
                continue
            return image, label, bad
        raise DataError(
            f"{self.max_consecutive_bad + 1} consecutive samples could not be loaded, starting at {bad}; "
            f"last: {last}. Is the image folder right?"
        )

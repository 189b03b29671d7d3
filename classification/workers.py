"""DataLoader worker setup shared by the CIFAR, Places365 and ImageNet DataModules."""

from __future__ import annotations

import cv2
from torch.utils.data import get_worker_info


def seed_worker(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: a distinct augmentation stream per worker and epoch, one OpenCV thread.

    torch gives every worker of every epoch its own seed; the albumentations pipeline copied into a forked
    worker would otherwise replay the parent's random stream in every worker. The dataset's `transform` is
    reseeded through albumentations' `set_random_seed` (an `A.Compose`, or a wrapper with the same method).
    OpenCV's own thread pool would oversubscribe the cores the other workers use.
    """
    cv2.setNumThreads(1)
    info = get_worker_info()
    transform = getattr(info.dataset, "transform", None)
    if hasattr(transform, "set_random_seed"):
        transform.set_random_seed(info.seed % 2**32)

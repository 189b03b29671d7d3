import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tools/ scripts import the packages the same way

# Two cores on CI: keep torch from oversubscribing them, and make results repeatable.
torch.set_num_threads(int(os.environ.get("TEST_TORCH_THREADS", "2")))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Tiny convs gain nothing from a second thread, and on a busy machine OpenMP's spinning costs 10-30x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The project's shared/ folder (beside the checkout, or inside it on the device machine)."""
    for candidate in (REPO.parent / "shared", REPO / "shared"):
        if candidate.is_dir():
            return candidate
    pytest.skip("shared/ folder with the real Places365 categories file is not beside the checkout")

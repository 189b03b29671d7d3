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


# CI installs every engine (.ci/run sets SENET_NO_SKIP): there a skipped test is a failure, not a quiet pass.
NO_SKIP = bool(os.environ.get("SENET_NO_SKIP"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if NO_SKIP and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped under SENET_NO_SKIP=1 (CI): {report.longrepr}"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    report = (yield).get_result()
    if NO_SKIP and report.skipped:
        report.outcome = "failed"
        report.longrepr = f"module skipped under SENET_NO_SKIP=1 (CI): {report.longrepr}"

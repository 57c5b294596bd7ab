"""Print what the corpus tests compared, and what they could not compare and why."""

from __future__ import annotations

import pytest


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    import sys

    mod = sys.modules.get("tests.corpus.test_deploy_nets")
    report = getattr(mod, "REPORT", None)
    if not report or not any(report.values()):
        return
    tr = terminalreporter
    tr.section("corpus deploy nets")
    total = len(report["built"]) + len(report["unsupported"])
    tr.write_line(f"built {len(report['built'])}/{total}; compared with OpenCV {len(report['compared'])}")
    for line in report["compared"]:
        tr.write_line(f"  compared: {line}")
    for line in report["unsupported"]:
        tr.write_line(f"  unsupported layer types: {line}")
    for line in report["not_compared"]:
        tr.write_line(f"  not compared with OpenCV: {line}")


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread for torch and OpenCV during these tests (restored after): two cores shared with
    xdist workers make OpenMP's thread wake-ups cost more than the small tensors' compute."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        import cv2
    except ImportError:
        cv2 = None
    ncv = cv2.getNumThreads() if cv2 is not None else None
    if cv2 is not None:
        cv2.setNumThreads(1)
    yield
    torch.set_num_threads(n)
    if cv2 is not None:
        cv2.setNumThreads(ncv)

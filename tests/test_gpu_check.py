"""``bench/gpu_check.py``, the prepared script for a lent GPU machine, runs here on the CPU in its
``--quick`` mode, so that it still works when a session finally has a GPU (its speed numbers mean
nothing here). Its CLI step is a real check on any device: ``caffeport train`` on the LMDB
fine-tuning golden case must log Caffe's losses."""

from __future__ import annotations

import json
from pathlib import Path


def test_gpu_check_quick_on_cpu(tmp_path: Path) -> None:
    from bench.gpu_check import main

    rc = main(["--device", "cpu", "--quick", "--skip-pytest", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert list(report) == ["environment", "cli_train", "inference", "training"]
    assert rc == 0, report
    cli = report["cli_train"]
    assert cli["iterations_compared"] == cli["of"] == 12 and cli["max_rel_error_vs_caffe"] <= 1e-3, cli
    assert cli["long_run"]["snapshot"] and cli["long_run"]["losses_logged"] >= 2, cli
    assert cli["cli_test"]["exact"]["exit"] == cli["cli_test"]["fast"]["exit"] == 0, cli
    assert report["inference"]["max_rel_error"] <= 5e-2 and report["inference"]["fast_img_s"] > 0
    assert report["training"]["summary"].count("first batch vs exact") == 1

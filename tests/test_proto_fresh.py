"""The committed caffeport/proto/caffe_pb2.py is exactly what protoc generates from proto/caffe.proto."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_generated_code_is_fresh(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{REPO / 'proto'}",
            f"--python_out={tmp_path}",
            str(REPO / "proto" / "caffe.proto"),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    fresh = (tmp_path / "caffe_pb2.py").read_text()
    committed = (REPO / "caffeport" / "proto" / "caffe_pb2.py").read_text()
    assert fresh == committed, "caffe_pb2.py is stale: run `make proto` and commit it"

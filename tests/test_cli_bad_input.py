"""Every command, given bad input, exits non-zero with one readable line: never a traceback, never a
half-written output file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BAD_NET = 'layer { name: "data" type: "Input" top: "data"\n  bogus_field: 3 }\n'
TRUNCATED = b"\x0a\x05hello\x92\x06\xff\xff"  # a NetParameter cut in the middle of a field


def _cases(d: Path) -> dict[str, list[str]]:
    bad, missing, trunc, out = str(d / "bad.prototxt"), str(d / "missing.prototxt"), str(d / "t.caffemodel"), d / "out"
    return {
        "info-bad-prototxt": ["info", bad],
        "info-truncated-weights": ["info", trunc],
        "upgrade-bad": ["upgrade", bad, str(out / "x.prototxt")],
        "train-missing-solver": ["train", str(d / "missing_solver.prototxt")],
        "test-bad-model": ["test", "--model", bad, "--weights", trunc],
        "time-bad-model": ["time", "--model", bad],
        "draw-bad": ["draw", bad, str(out / "x.dot")],
        "deploy-bad": ["deploy", bad, "-o", str(out / "x.prototxt")],
        "export-onnx-bad": ["export-onnx", bad, "-o", str(out / "x.onnx")],
        "export-torch-bad": ["export-torch", bad, "-o", str(out / "x.pt")],
        "export-weights-bad": ["export-weights", bad, "-o", str(out / "x.npz")],
        "truncate-bad": ["truncate", bad, "--blob", "data", "-o", str(out / "x.prototxt")],
        "convolutionalize-bad": ["convolutionalize", bad, "-o", str(out / "x.prototxt")],
        "compute-image-mean-missing-db": ["compute-image-mean", str(d / "no_db"), str(out / "m.binaryproto")],
        "convert-imageset-missing-list": ["convert-imageset", str(d) + "/", str(d / "no_list.txt"), str(out / "db")],
        "parse-log-missing": ["parse-log", str(d / "no.log"), str(out)],
        "plot-log-missing": ["plot-log", str(d / "no.log"), str(out / "c.png")],
        "predict-bad-model": ["predict", str(d), "--model", missing, "--weights", trunc, "--out", str(out / "s.csv")],
        "create-lmdb-missing": ["create-lmdb", str(d / "no_train_dir"), str(out)],
        "extract-features-bad": ["extract-features", trunc, bad, "data", str(out / "f"), "1", "lmdb", "CPU"],
    }


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("bad")
    (d / "bad.prototxt").write_text(BAD_NET)
    (d / "t.caffemodel").write_bytes(TRUNCATED)
    (d / "out").mkdir()
    return d


@pytest.mark.parametrize("case", sorted(_cases(Path("/x"))))
def test_bad_input_gives_one_line_and_nonzero_exit(case: str, workdir: Path) -> None:
    args = _cases(workdir)[case]
    before = set(os.listdir(workdir / "out"))
    r = subprocess.run([sys.executable, "-m", "caffeport", *args], capture_output=True, text=True, timeout=120,
                       cwd=workdir)
    err = r.stderr.strip()
    assert r.returncode != 0, f"{case}: exit 0\n{r.stdout}\n{err}"
    assert "Traceback" not in err, f"{case}: traceback\n{err}"
    last = err.splitlines()[-1] if err else ""
    assert last.startswith(("caffeport: error:", "Error:")), f"{case}: unexpected stderr\n{err}"
    assert set(os.listdir(workdir / "out")) == before, f"{case}: left files behind"

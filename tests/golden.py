"""Load the BVLC Caffe golden cases (../shared/golden) through caffeport's public API."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = (REPO / ".." / "shared").resolve()
GOLDEN = SHARED / "golden"
CORPUS = SHARED / "corpus"
# The device the golden forward/backward and solver cases run on: cpu here and in CI;
# ``CAFFEPORT_TEST_DEVICE=cuda`` (bench/gpu_check.sh) runs the same cases on a GPU.
TEST_DEVICE = os.environ.get("CAFFEPORT_TEST_DEVICE", "cpu")


def cases(kind: str | None = None) -> list[str]:
    """Names of the golden cases (of one kind)."""
    index = json.loads((GOLDEN / "cases.json").read_text())
    return [c["name"] for c in index["cases"] if kind is None or c["kind"] == kind]


def case_dir(name: str) -> Path:
    return GOLDEN / name


def case_info(name: str) -> dict:
    return json.loads((case_dir(name) / "case.json").read_text())


def npz(name: str, file: str) -> dict[str, np.ndarray]:
    with np.load(case_dir(name) / file) as d:
        return {k: d[k] for k in d.files}


def caffe_filled_params(name: str) -> dict[str, dict[int, np.ndarray]]:
    """A solver case's parameters that Caffe filled with its own RNG (not loaded from its
    init.caffemodel): ``{layer: {blob index: Caffe's value at iteration 0}}``, so that a run can start
    from them (Caffe's random streams cannot be reproduced)."""
    init_layers = set(case_info(name).get("init_caffemodel_layers", []))
    out: dict[str, dict[int, np.ndarray]] = {}
    for k, v in npz(name, "trace.npz").items():
        if k.startswith("param/") and k.endswith("@0"):
            layer, i = k[len("param/"):-len("@0")].rsplit("/", 1)
            if layer not in init_layers:
                out.setdefault(layer, {})[int(i)] = v
    return out


@contextlib.contextmanager
def in_case(name: str) -> Iterator[Path]:
    """Run with the case folder as cwd and on sys.path (Python layer modules live there)."""
    d = case_dir(name)
    old = os.getcwd()
    os.chdir(d)
    sys.path.insert(0, str(d))
    try:
        yield d
    finally:
        os.chdir(old)
        with contextlib.suppress(ValueError):
            sys.path.remove(str(d))


def assert_close(got: np.ndarray, ref: np.ndarray, atol: float, rtol: float, what: str) -> None:
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert got.shape == ref.shape, f"{what}: shape {got.shape}, Caffe {ref.shape}"
    err = np.abs(got - ref)
    bad = err > atol + rtol * np.abs(ref)
    if bad.any():
        i = np.unravel_index(np.argmax(err - (atol + rtol * np.abs(ref))), err.shape)
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{bad.size} values off; worst at {i}: got {got[i]!r}, Caffe {ref[i]!r} "
            f"(max abs err {err.max():.3g}, atol {atol}, rtol {rtol})"
        )

"""Caffe's tools (convert_imageset, compute_image_mean, extract_features) against BVLC Caffe's artefacts.

Each tool case's command lines are run with OUR CLI in a writable copy of the case folder (inputs
only); the databases written are decoded and compared with datums.json/datums.npz or
features.json/features.npz, and mean.binaryproto with mean.npz.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import lmdb
import numpy as np
import pytest
from click.testing import CliRunner

from caffeport.cli import main
from caffeport.layers.base import registry
from caffeport.proto import caffe_pb2
from tests.golden import assert_close, case_dir, case_info, cases

TOOL_CASES = cases("tool")
# Artefacts the tools must (re)produce; everything else in the case folder is an input.
_PRODUCED = {"datums.json", "datums.npz", "mean.npz", "features.json", "features.npz", "outputs.npz"}


def _records(db: Path) -> list[tuple[bytes, bytes]]:
    env = lmdb.open(str(db), readonly=True, lock=False)
    with env.begin() as txn:
        out = [(bytes(k), bytes(v)) for k, v in txn.cursor()]
    env.close()
    return out


def _workdir(name: str, tmp: Path) -> tuple[Path, dict]:
    info = case_info(name)
    src = case_dir(name)
    outputs = {c[-1] for c in info["commands"]}
    outputs |= {p for c in info["commands"] if c[0] == "extract_features" for p in c[4].split(",")}
    work = tmp / name
    work.mkdir()
    for p in src.iterdir():
        if p.name in outputs or p.name in _PRODUCED:
            continue
        if p.is_dir():
            shutil.copytree(p, work / p.name)
        else:
            shutil.copy(p, work / p.name)
    for root, dirs, files in os.walk(work):
        for f in dirs + files:
            os.chmod(os.path.join(root, f), 0o755)
    return work, info


def _run(work: Path, command: list[str]) -> None:
    old = os.getcwd()
    os.chdir(work)
    try:
        res = CliRunner().invoke(main, command, catch_exceptions=False)
    finally:
        os.chdir(old)
    assert res.exit_code == 0, res.output


def _needs_layers(info: dict) -> None:
    missing = [t for t in info["layer_types"] if t not in registry()]
    assert not missing, f"layer types not registered: {missing}"


@pytest.mark.parametrize("name", TOOL_CASES)
def test_tool_case(name: str, tmp_path: Path) -> None:
    work, info = _workdir(name, tmp_path)
    _needs_layers(info)
    for cmd in info["commands"]:
        _run(work, cmd)
    src = case_dir(name)
    expected = set(info["expected"])
    atol, rtol = info["atol"], info["rtol"]
    if "datums.json" in expected:
        want = json.loads((src / "datums.json").read_text())
        arrays = np.load(src / "datums.npz")
        db = [e for e in expected if (src / e).is_dir()][0]
        got = _records(work / db)
        assert [k.decode() for k, _ in got] == [w["key"] for w in want]
        for i, ((_, v), w) in enumerate(zip(got, want)):
            d = caffe_pb2.Datum()
            d.ParseFromString(v)
            assert (d.label, d.encoded, d.channels, d.height, d.width) == (
                w["label"], w["encoded"], w["channels"], w["height"], w["width"]
            ), f"record {i}"
            assert len(d.data) == w["data_bytes"] and len(d.float_data) == w["float_data"]
            if f"datum/{i}" in arrays:
                pix = np.frombuffer(d.data, np.uint8).reshape(d.channels, d.height, d.width)
                assert_close(pix, arrays[f"datum/{i}"], atol, rtol, f"{name}: datum {i}")
            if f"encoded_bytes/{i}" in arrays:
                assert d.data == arrays[f"encoded_bytes/{i}"].tobytes(), f"record {i}: encoded bytes differ"
    if "mean.npz" in expected:
        bp = caffe_pb2.BlobProto()
        bp.ParseFromString((work / "mean.binaryproto").read_bytes())
        assert not bp.HasField("shape"), "compute_image_mean writes legacy num/channels/height/width"
        shape = (bp.num, bp.channels, bp.height, bp.width)
        ref = np.load(src / "mean.npz")["mean"]
        assert shape == ref.shape
        np.testing.assert_array_equal(np.asarray(bp.data, np.float32).reshape(shape), ref)
    if "features.json" in expected:
        want = json.loads((src / "features.json").read_text())
        arrays = np.load(src / "features.npz")
        for db, recs in want.items():
            got = _records(work / db)
            assert [k.decode() for k, _ in got] == [r["key"] for r in recs]
            feats = []
            for (_, v), r in zip(got, recs):
                d = caffe_pb2.Datum()
                d.ParseFromString(v)
                assert (d.channels, d.height, d.width, len(d.float_data)) == (
                    r["channels"], r["height"], r["width"], r["float_data"]
                )
                feats.append(np.asarray(d.float_data, np.float32))
            assert_close(np.stack(feats), arrays[db], atol, rtol, f"{name}: {db}")

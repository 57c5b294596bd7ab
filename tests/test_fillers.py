"""Caffe fillers against the fillers_stats golden case (values from Caffe's own fillers) and
against their defining distributions."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from caffeport.errors import CaffeportError
from caffeport.fillers import fans, fill
from caffeport.proto import caffe_pb2
from tests.golden import case_dir

CASE = "fillers_stats"


def _stats() -> dict:
    return json.loads((case_dir(CASE) / "filler_stats.json").read_text())


def _filler(text: str) -> caffe_pb2.FillerParameter:
    return text_format.Parse(text, caffe_pb2.FillerParameter())


def _caffe_blobs() -> dict[str, np.ndarray]:
    net = caffe_pb2.NetParameter()
    net.ParseFromString((case_dir(CASE) / "weights.caffemodel").read_bytes())
    out = {}
    for layer in net.layer:
        for i, b in enumerate(layer.blobs):
            out[f"param/{layer.name}/{i}"] = np.array(b.data, dtype=np.float32).reshape(tuple(b.shape.dim))
    return out


STATS = _stats()


@pytest.mark.parametrize("key", sorted(STATS))
def test_fans_match_caffe(key: str) -> None:
    s = STATS[key]
    if s["fan_in"] is None:
        return
    assert fans(tuple(s["shape"])) == (s["fan_in"], s["fan_out"])


@pytest.mark.parametrize("key", [k for k, s in STATS.items() if s["filler"].split('"')[1] in ("bilinear", "constant")])
def test_deterministic_fillers_exact(key: str) -> None:
    s = STATS[key]
    got = fill(tuple(s["shape"]), _filler(s["filler"])).numpy()
    ref = _caffe_blobs()[key]
    assert got.shape == ref.shape
    np.testing.assert_array_equal(got, ref)


RANDOM = [k for k, s in STATS.items() if s["filler"].split('"')[1] not in ("bilinear", "constant")]


@pytest.mark.parametrize("key", RANDOM)
def test_random_fillers_distribution(key: str) -> None:
    """Same shape; mean/std/range consistent with Caffe's sample and with the defining distribution."""
    s = STATS[key]
    f = _filler(s["filler"])
    shape = tuple(s["shape"])
    g = torch.Generator().manual_seed(1234)
    # Large sample of the same filler (same fan computation: replicate the blob along a new leading
    # copy dimension is not possible, so draw many blobs).
    draws = np.concatenate([fill(shape, f, generator=g).numpy().ravel() for _ in range(50)])
    ref = _caffe_blobs()[key].ravel()
    assert fill(shape, f).shape == shape
    n = ref.size
    # Caffe's sample and ours estimate the same mean/std: compare with a tolerance from the sample size.
    se = max(s["std"], 1e-12) / math.sqrt(n)
    assert abs(draws.mean() - s["mean"]) < 6 * se + 1e-7
    if s["std"] > 0:
        assert abs(draws.std() - s["std"]) < 5 * s["std"] / math.sqrt(2 * n)
    kind = f.type
    if kind in ("uniform", "xavier"):
        lo, hi = (f.min, f.max) if kind == "uniform" else (-math.sqrt(3 / s["fan_in"]), math.sqrt(3 / s["fan_in"]))
        assert draws.min() >= lo - 1e-7 and draws.max() <= hi + 1e-7
        assert ref.min() >= lo - 1e-7 and ref.max() <= hi + 1e-7
        assert abs(draws.std() - (hi - lo) / math.sqrt(12)) < 0.01 * (hi - lo)
    if kind == "msra":
        assert abs(draws.std() - math.sqrt(2 / s["fan_in"])) < 0.02 * math.sqrt(2 / s["fan_in"])
    if kind == "gaussian":
        assert abs(draws.std() - f.std) < 0.02 * f.std
    if kind == "positive_unitball":
        one = fill(shape, f).numpy()
        assert (one > 0).all()
        np.testing.assert_allclose(one.reshape(shape[0], -1).sum(1), 1.0, rtol=1e-5)
        np.testing.assert_allclose(ref.reshape(shape[0], -1).sum(1), 1.0, rtol=1e-5)


def test_default_filler_is_constant_zero() -> None:
    assert torch.equal(fill((3, 4)), torch.zeros(3, 4))
    assert torch.equal(fill((5,), _filler('type: "constant" value: 2.5')), torch.full((5,), 2.5))


def test_bilinear_odd_kernel_formula() -> None:
    # Independent formula (float64): factor f = ceil(k/2), centre c = (2f-1-f%2)/(2f),
    # w(x) = 1 - |x/f - c|, separable.
    k = 5
    f = math.ceil(k / 2)
    c = (2 * f - 1 - f % 2) / (2 * f)
    w = np.array([1 - abs(x / f - c) for x in range(k)])
    got = fill((2, 3, k, k), _filler('type: "bilinear"')).numpy()
    for i in range(2):
        for j in range(3):
            np.testing.assert_allclose(got[i, j], np.outer(w, w), rtol=0, atol=1e-6)


def test_xavier_variance_norm_fan_out_and_average() -> None:
    shape = (20, 30, 3, 3)
    fan_in, fan_out = 270, 180
    g = torch.Generator().manual_seed(0)
    for norm, n in (("FAN_OUT", fan_out), ("AVERAGE", (fan_in + fan_out) / 2)):
        x = fill(shape, _filler(f'type: "xavier" variance_norm: {norm}'), generator=g)
        bound = math.sqrt(3 / n)
        assert x.abs().max() <= bound
        assert x.abs().max() > 0.95 * bound
        y = fill(shape, _filler(f'type: "msra" variance_norm: {norm}'), generator=g)
        assert abs(float(y.std()) - math.sqrt(2 / n)) < 0.05 * math.sqrt(2 / n)


def test_sparse_gaussian_keep_fraction() -> None:
    g = torch.Generator().manual_seed(0)
    x = fill((10, 5000), _filler('type: "gaussian" std: 1 sparse: 3'), generator=g)
    frac = float((x != 0).float().mean())
    assert abs(frac - 0.3) < 0.01


@pytest.mark.parametrize(
    "shape,text,msg",
    [
        ((4, 4), 'type: "nosuch"', "unknown filler"),
        ((4, 4), 'type: "xavier" sparse: 2', "sparsity"),
        ((4, 4), 'type: "constant" sparse: 0', "sparsity"),
        ((2, 1, 3, 4), 'type: "bilinear"', "square"),
        ((2, 3, 3), 'type: "bilinear"', "4 dim"),
        ((4, 4), 'type: "gaussian" std: 0', "std"),
        ((4, 4), 'type: "gaussian" sparse: 5', "exceeds"),
        ((4, 4), 'type: "uniform" min: 1 max: 0', "min <= max"),
    ],
)
def test_filler_errors(shape, text, msg) -> None:
    with pytest.raises(CaffeportError, match=msg):
        fill(shape, _filler(text))

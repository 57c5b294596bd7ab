"""Fast training (``caffeport.fast_train``) against BVLC Caffe's recorded solver traces.

fp32 eager fast mode must reproduce Caffe's loss trace and final weights within the golden case's
own tolerances; bf16 must stay within a loose documented tolerance of Caffe's loss curve; the one
compiled run is fp32 and checked the same way; a compiler that fails gives one notice and eager.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import caffeport
from caffeport import fast_train
from caffeport.cli import main
from caffeport.errors import CaffeportError
from caffeport.fast import FastModeNotice
from caffeport.io import load_caffemodel, read_solver
from caffeport.solver import get_solver
from tests.golden import assert_close, caffe_filled_params, case_dir, case_info, in_case, npz

CASES = ["solver_sgd_momentum_step", "solver_sgd_itersize2", "solver_adam_poly"]
# bf16 conv/fc (8 mantissa bits) on these tiny nets: Caffe's loss curve within 5% (relative, per
# iteration), the final weights within 5% of their largest magnitude per blob.
BF16_LOSS_RTOL = 5e-2
BF16_WEIGHT_RTOL = 5e-2


def _solver(name: str, tmp_path: Path, **fast: object) -> caffeport.solver.Solver:
    param = read_solver(case_dir(name) / "solver.prototxt")
    param.snapshot_prefix = str(tmp_path / "snapshot")
    param.snapshot = 0
    param.snapshot_after_train = False
    solver = get_solver(param)
    for layer, blobs in caffe_filled_params(name).items():  # Caffe's RNG: start from Caffe's values
        for i, v in blobs.items():
            solver.net.params[layer][i].data[...] = v
    solver.enable_fast(**fast)
    return solver


def _run(name: str, tmp_path: Path, **fast: object) -> tuple[caffeport.solver.Solver, list[float]]:
    losses: list[float] = []
    with in_case(name):
        s = _solver(name, tmp_path, **fast)
        s.add_callback(on_gradients_ready=lambda: losses.append(s.last_loss))
        s.step(int(case_info(name)["max_iter"]))
    return s, losses


def _final(name: str) -> dict[str, list[np.ndarray]]:
    return load_caffemodel(case_dir(name) / "final.caffemodel")


@pytest.mark.parametrize("name", CASES)
def test_fp32_eager_reproduces_caffe(name: str, tmp_path: Path) -> None:
    info = case_info(name)
    s, losses = _run(name, tmp_path, precision="fp32", compile=False)
    assert s.fast.precision == "fp32" and not s.fast.compiled and s.fast.channels_last
    assert s.fast.grad_rel_error <= 1e-5 and s.fast.loss_rel_error <= 1e-6, s.fast.summary()
    assert_close(np.array(losses), npz(name, "trace.npz")["loss"], info["atol"], info["rtol"], f"{name} loss")
    for layer, blobs in _final(name).items():
        for i, ref in enumerate(blobs):
            assert_close(s.net.params[layer][i].data, ref, info["atol"], info["rtol"], f"{name} {layer}[{i}]")


def test_bf16_stays_near_caffe_curve(tmp_path: Path) -> None:
    name = "solver_sgd_momentum_step"
    s, losses = _run(name, tmp_path, precision="bf16", compile=False)
    assert s.fast.precision == "bf16"
    ref = npz(name, "trace.npz")["loss"].astype(np.float64)
    rel = np.abs(np.array(losses) - ref) / np.abs(ref)
    assert rel.max() <= BF16_LOSS_RTOL, rel
    assert 0 < s.fast.grad_rel_error <= fast_train.BF16_TOLERANCES["grad"], s.fast.summary()
    for layer, blobs in _final(name).items():
        for i, w in enumerate(blobs):
            got = s.net.params[layer][i].data
            assert np.abs(got - w).max() <= BF16_WEIGHT_RTOL * np.abs(w).max(), f"{layer}[{i}]"
    # the bf16 run is really not the fp32 one (the check would pass a silent fp32 fallback)
    assert not np.allclose(losses, ref, rtol=1e-6, atol=0)


def test_check_refuses_above_tolerance(tmp_path: Path) -> None:
    with in_case("solver_sgd_momentum_step"):
        s = _solver("solver_sgd_momentum_step", tmp_path, precision="bf16", compile=False,
                    tolerances={"grad": 1e-9})
        with pytest.raises(CaffeportError, match=r"fast training refused.*gradient relative difference"):
            s.step(1)


def test_compile_failure_falls_back_with_one_notice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(module: torch.nn.Module):  # what a missing C++ compiler looks like from torch.compile
        def call(*a: object, **k: object) -> object:
            raise RuntimeError("InductorError: no working C++ compiler found")
        return call

    monkeypatch.setattr(fast_train, "_compile", broken)
    name = "solver_sgd_momentum_step"
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        s, losses = _run(name, tmp_path, precision="fp32", compile=True)
    notices = [w for w in got if issubclass(w.category, FastModeNotice)]
    assert len(notices) == 1 and "torch.compile is not usable" in str(notices[0].message)
    assert not s.fast.compiled and "eager" in s.fast.summary()
    info = case_info(name)
    assert_close(np.array(losses), npz(name, "trace.npz")["loss"], info["atol"], info["rtol"], "loss")


def test_compiled_fp32_reproduces_caffe(tmp_path: Path) -> None:
    """The suite's one real torch.compile (inductor) run."""
    name = "solver_sgd_momentum_step"
    s, losses = _run(name, tmp_path, precision="fp32", compile=True)
    assert s.fast.compiled, s.fast.notices
    info = case_info(name)
    assert_close(np.array(losses), npz(name, "trace.npz")["loss"], info["atol"], info["rtol"], "loss")
    for layer, blobs in _final(name).items():
        for i, ref in enumerate(blobs):
            assert_close(s.net.params[layer][i].data, ref, info["atol"], info["rtol"], f"{layer}[{i}]")


def test_from_solver_fast_plain_loop(tmp_path: Path) -> None:
    name = "solver_sgd_itersize2"
    info = case_info(name)
    with in_case(name) as d:
        model, optimizer, scheduler = caffeport.from_solver(d / "solver.prototxt",
                                                            fast={"precision": "fp32", "compile": False})
        assert model.fast is not None
        param = read_solver(d / "solver.prototxt")
        losses = []
        for _ in range(param.max_iter):
            optimizer.zero_grad()
            total = np.float32(0)
            for _ in range(param.iter_size):
                loss = model.loss(model())
                loss.backward()
                total = np.float32(total + np.float32(float(loss.detach())))
            losses.append(float(np.float32(total / np.float32(param.iter_size))))
            optimizer.step()
            scheduler.step()
    assert model.fast.checked and model.fast.grad_rel_error <= 1e-5
    assert_close(np.array(losses), npz(name, "trace.npz")["loss"], info["atol"], info["rtol"], "loss")
    for layer, blobs in _final(name).items():
        for i, ref in enumerate(blobs):
            assert_close(model.params[layer][i].detach().numpy(), ref, info["atol"], info["rtol"], f"{layer}[{i}]")


@pytest.fixture()
def case(tmp_path: Path):
    d = tmp_path / "case"
    shutil.copytree(case_dir("solver_sgd_momentum_step"), d)
    for p in d.rglob("*"):
        p.chmod(0o644 if p.is_file() else 0o755)
    old = os.getcwd()
    os.chdir(d)
    yield d
    os.chdir(old)


def test_cli_train_fast_end_to_end(case: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAFFEPORT_NO_COMPILE", "1")
    r = CliRunner().invoke(main, ["train", "solver.prototxt", "--fast", "--log", "train.log"])
    assert r.exit_code == 0, r.output
    fast_lines = [ln for ln in (case / "train.log").read_text().splitlines() if "] Fast mode: " in ln]
    assert len(fast_lines) == 1 and "eager" in fast_lines[0] and "first batch vs exact" in fast_lines[0]
    info = case_info("solver_sgd_momentum_step")
    got = load_caffemodel(case / "snapshot_iter_12.caffemodel")  # Caffe's layout, despite channels_last
    tol = (5e-2, 5e-2) if "bf16" in fast_lines[0] else (info["atol"], info["rtol"])
    for layer, blobs in _final("solver_sgd_momentum_step").items():
        for i, ref in enumerate(blobs):
            assert_close(got[layer][i], ref, tol[0] * float(np.abs(ref).max()), tol[1], f"{layer}[{i}]")


def test_cli_train_fast_refuses_data_parallel(case: Path) -> None:
    r = CliRunner().invoke(main, ["train", "solver.prototxt", "--fast", "--gpu", "cpu:2"])
    assert r.exit_code != 0
    assert "--fast is single-process only" in r.output


def _ip_net(axis: int, transpose: bool, bias: bool, shape: tuple[int, ...]) -> caffeport.Net:
    from google.protobuf import text_format

    from caffeport.proto import caffe_pb2

    p = caffe_pb2.NetParameter()
    dims = " ".join(f"dim: {d}" for d in shape)
    text_format.Parse(
        f'layer {{ name: "x" type: "Input" top: "x" input_param {{ shape {{ {dims} }} }} }}\n'
        f'layer {{ name: "ip" type: "InnerProduct" bottom: "x" top: "y" inner_product_param {{ num_output: 7 '
        f'axis: {axis} transpose: {str(transpose).lower()} bias_term: {str(bias).lower()} '
        f'weight_filler {{ type: "gaussian" std: 1 }} bias_filler {{ type: "gaussian" std: 1 }} }} }}', p)
    return caffeport.Net(p, phase=caffeport.TRAIN)


@pytest.mark.parametrize("axis,transpose,bias,shape", [
    (1, False, True, (5, 3, 4)), (1, True, True, (5, 12)), (-1, False, False, (2, 3, 6)),
    (2, True, True, (2, 3, 2, 2)), (1, False, True, (0, 6)), (1, False, True, (4, 0)),
])
def test_low_precision_inner_product_against_float64(axis: int, transpose: bool, bias: bool,
                                                     shape: tuple[int, ...]) -> None:
    """Fast training's own bf16 InnerProduct (eager CPU): top and the three gradients against a float64
    numpy computation, at bf16 accuracy; two backwards accumulate in .grad although the weight
    gradient comes from a reused buffer."""
    net = _ip_net(axis, transpose, bias, shape)
    layer = next(p.layer for p in net._plans if p.layer.param.type == "InnerProduct")
    rng = np.random.default_rng(3)
    x = torch.tensor(rng.normal(size=shape), dtype=torch.float32, requires_grad=True)
    ax = axis % len(shape)
    m, k = int(np.prod(shape[:ax])), int(np.prod(shape[ax:]))
    g = rng.normal(size=(m, 7))
    w = layer.blobs[0].detach().double().numpy()
    w_nk = w.T if transpose else w
    x2 = x.detach().double().numpy().reshape(m, k)
    want_y = x2 @ w_nk.T + (layer.blobs[1].detach().double().numpy() if bias else 0)
    for p in layer.blobs:
        p.grad = torch.zeros_like(p)
    for _ in range(2):
        y = layer.forward_low_precision(x, dtype=torch.bfloat16)
        assert y.dtype == torch.float32 and y.shape == (*shape[:ax], 7)
        y.reshape(m, 7).backward(torch.tensor(g, dtype=torch.float32))
    scale = max([1.0, *np.abs(want_y).ravel()])
    assert np.all(np.abs(y.detach().double().numpy().reshape(m, 7) - want_y) <= 2e-2 * scale)
    gw = 2 * (g.T @ x2)
    gw = gw.T if transpose else gw
    gx = 2 * (g @ w_nk)
    for got, want in ((layer.blobs[0].grad, gw), (x.grad.reshape(m, k), gx)):
        assert got.dtype == torch.float32
        err = np.abs(got.double().numpy() - want)
        assert err.size == 0 or err.max() <= 2e-2 * max([1.0, *np.abs(want).ravel()])
    if bias:
        np.testing.assert_allclose(layer.blobs[1].grad.double().numpy(), 2 * g.sum(0), rtol=1e-5, atol=1e-5)


def test_eager_cpu_fast_training_uses_the_layers_own_low_precision_forward(tmp_path: Path) -> None:
    with in_case("solver_sgd_momentum_step"):
        s = _solver("solver_sgd_momentum_step", tmp_path, precision="bf16", compile=False)
        own = {p.layer.param.type for p, o in zip(s.fast.compute._plans, s.fast.compute._own) if o}
        assert "InnerProduct" in own and "Convolution" not in own
        s.step(1)
        ip = next(p.layer for p in s.net._plans if p.layer.param.type == "InnerProduct")
        assert ip._low_precision_buffers["weight"].dtype == torch.bfloat16


def test_low_precision_inner_product_two_forwards_into_one_loss() -> None:
    """Two forwards of one layer summed into one loss: the reused gradient buffer must not make the
    second gradient count twice (only the newest forward's backward writes it)."""
    net = _ip_net(1, False, True, (4, 6))
    layer = next(p.layer for p in net._plans if p.layer.param.type == "InnerProduct")
    rng = np.random.default_rng(5)
    xs = [torch.tensor(rng.normal(size=(4, 6)), dtype=torch.float32) for _ in range(2)]
    gs = [rng.normal(size=(4, 7)) for _ in range(2)]
    for p in layer.blobs:
        p.grad = torch.zeros_like(p)
    ys = [layer.forward_low_precision(x, dtype=torch.bfloat16) for x in xs]
    sum((y * torch.tensor(g, dtype=torch.float32)).sum() for y, g in zip(ys, gs)).backward()
    want = sum(g.T @ x.double().numpy() for g, x in zip(gs, xs))
    got = layer.blobs[0].grad.double().numpy()
    assert np.abs(got - want).max() <= 2e-2 * np.abs(want).max()


def test_low_precision_inner_product_weight_changed_before_backward_raises() -> None:
    net = _ip_net(1, False, True, (4, 6))
    layer = next(p.layer for p in net._plans if p.layer.param.type == "InnerProduct")
    y = layer.forward_low_precision(torch.ones(4, 6), dtype=torch.bfloat16)
    with torch.no_grad():
        layer.blobs[0].add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()

"""Every BVLC Caffe solver golden case reproduced by the *plain PyTorch loop* over
``caffeport.from_solver``'s ``(model, optimizer, scheduler)``: per-iteration loss and lr, the raw
accumulated gradients, weights at the recorded iterations, and the history Caffe snapshots at
``max_iter`` (``final.solverstate``) from ``optimizer.to_solverstate``. Test-net outputs are not
part of the plain loop (``tests/solver/test_golden_solver.py`` checks them through ``caffeport train``'s Solver)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import caffeport
from caffeport.io import load_caffemodel, read_solverstate
from tests.golden import assert_close, case_info, cases, in_case, npz
from tests.solver.test_golden_solver import _key

SOLVER_CASES = cases("solver")


def _snap(model: caffeport.optim.TrainModule) -> dict[str, list[np.ndarray]]:
    return {name: [t.detach().numpy().copy() for t in ts] for name, ts in model.params.items()}


def _run_plain_loop(name: str) -> dict:
    info = case_info(name)
    trace = npz(name, "trace.npz")
    with in_case(name) as d:
        model, optimizer, scheduler = caffeport.from_solver(d / "solver.prototxt")
        assert isinstance(optimizer, torch.optim.Optimizer)
        assert type(optimizer).__name__ == info["solver_type"]
        assert isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler)
        init_layers = set(info.get("init_caffemodel_layers", []))
        with torch.no_grad():  # layers Caffe filled with its own RNG start from Caffe's values
            for k, v in trace.items():
                if k.startswith("param/") and k.endswith("@0"):
                    layer, i, _ = _key(k)
                    if layer not in init_layers:
                        model.params[layer][i].copy_(torch.from_numpy(v))
        iter_size = int(info["iter_size"])
        got: dict = {"loss": [], "lr": [], "lpf": [], "grad": {}, "param": {}}
        for it in range(int(info["max_iter"])):
            if it in info["param_snapshot_iters"]:
                got["param"][it] = _snap(model)
            optimizer.zero_grad()
            total, lpf = np.float32(0), []
            for _ in range(iter_size):
                out = model()
                loss = model.loss(out)
                loss.backward()
                lpf.append(float(loss.detach()))
                total = np.float32(total + np.float32(lpf[-1]))
            got["loss"].append(float(np.float32(total / np.float32(iter_size))))
            got["lpf"].append(lpf)
            got["lr"].append(optimizer.param_groups[0]["lr"])
            if it in info["grad_iters"]:
                got["grad"][it] = {n: [(t.grad if t.grad is not None else torch.zeros_like(t)).detach().numpy().copy()
                                       for t in ts] for n, ts in model.params.items()}
            optimizer.step()
            scheduler.step()
        got["param"][int(info["max_iter"])] = _snap(model)
        got["state"] = optimizer.to_solverstate(model.caffe_params(), "final.caffemodel", scheduler.solverstate_step)
        got["dir"] = d
    return got


@pytest.mark.parametrize("name", SOLVER_CASES)
def test_plain_loop_reproduces_caffe(name: str) -> None:
    info = case_info(name)
    atol, rtol = info["atol"], info["rtol"]
    trace = npz(name, "trace.npz")
    got = _run_plain_loop(name)
    assert len(got["loss"]) == info["max_iter"]
    assert_close(np.array(got["loss"], np.float32), trace["loss"], atol, rtol, f"{name}: loss")
    assert_close(np.array(got["lr"], np.float32), trace["lr"], 0, 1e-6, f"{name}: lr")
    if "loss_per_forward" in trace:
        assert_close(np.array(got["lpf"], np.float32), trace["loss_per_forward"], atol, rtol, f"{name}: lpf")
    n = 0
    for k, ref in trace.items():
        if k.startswith(("grad/", "param/")):
            layer, i, it = _key(k)
            assert_close(got["grad" if k.startswith("grad/") else "param"][it][layer][i], ref, atol, rtol,
                         f"{name}: {k}")
            n += 1
    assert n > 0
    # Caffe's final snapshot: weights and the solverstate history in Caffe's layout
    ref_w = load_caffemodel(got["dir"] / "final.caffemodel")
    final = got["param"][info["max_iter"]]
    for layer, blobs in ref_w.items():
        for i, b in enumerate(blobs):
            assert_close(final[layer][i], b, atol, rtol, f"{name}: final.caffemodel {layer}/{i}")
    ref_s = read_solverstate(got["dir"] / "final.solverstate")
    st = got["state"]
    assert st.iter == ref_s.iter == info["max_iter"]
    assert st.current_step == ref_s.current_step
    assert len(st.history) == len(ref_s.history)
    for i, (a, b) in enumerate(zip(st.history, ref_s.history)):
        assert a.size == b.size, f"{name}: history {i}"
        assert_close(a.reshape(b.shape), b, atol, rtol, f"{name}: final.solverstate history {i}")

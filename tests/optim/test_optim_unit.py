"""caffeport.optim on the tiny Input-fed net of tests/solver/_tiny.py, checked against the independent
numpy model of Caffe's update rules there: the six optimizers in the plain loop, state_dict round
trips (torch.save / torch.load(weights_only=True)), .solverstate conversion both ways with
``caffeport train``'s Solver, the optimizer on a user's own module, frozen blobs and errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import caffeport
from caffeport.errors import CaffeportError
from caffeport.io import read_solverstate
from caffeport.optim import SGD, AdaGrad, LRPolicy, from_solver, load_solverstate, save_solverstate
from caffeport.proto import caffe_pb2
from caffeport.solver import get_solver
from tests.solver._tiny import NET, X, Y, feed, numpy_train, write_case
from tests.solver.test_solver_unit import RULE_CASES

ADAM_MULTISTEP = ('type: "Adam" base_lr: 0.05 momentum: 0.9 weight_decay: 0.001\nlr_policy: "multistep" gamma: 0.5 '
                  'stepvalue: 3 stepvalue: 7\nmax_iter: 12\nsnapshot: 6')


def _multistep(it: int) -> float:
    return 0.05 * 0.5 ** sum(it >= s for s in (3, 7))


def _loop(model, optimizer, scheduler, iters: int) -> list[float]:
    losses = []
    x, y = torch.from_numpy(X), torch.from_numpy(Y)
    for _ in range(iters):
        optimizer.zero_grad()
        loss = model.loss(model(x=x, y=y))
        loss.backward()
        losses.append(float(loss.detach()))
        optimizer.step()
        scheduler.step()
    return losses


def _wb(model) -> tuple[np.ndarray, np.ndarray]:
    return tuple(t.detach().numpy().copy() for t in model.params["ip"])


@pytest.mark.parametrize("kind", sorted(RULE_CASES))
def test_each_optimizer_matches_numpy_model(kind: str, tmp_path: Path) -> None:
    text, kw = RULE_CASES[kind]
    base_lr = float(text.split("base_lr: ")[1].split()[0])
    model, opt, sched = from_solver(write_case(tmp_path, text + '\nlr_policy: "fixed"\nmax_iter: 15'))
    assert type(opt).__name__ == kind and isinstance(opt, torch.optim.Optimizer)
    w0, b0 = _wb(model)
    losses = _loop(model, opt, sched, 15)
    w, b, ref = numpy_train(w0, b0, kind, 15, base_lr=base_lr, weight_decay=0.01, **kw)
    np.testing.assert_allclose(losses, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_wb(model)[0], w, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(_wb(model)[1], b, rtol=1e-4, atol=1e-5)


def test_state_dict_round_trip(tmp_path: Path) -> None:
    """6 iterations, torch.save of model/optimizer/scheduler state, a fresh trio loaded, 6 more ==
    the numpy model's 12 (Adam's bias correction and multistep's current_step travel in the state)."""
    path = write_case(tmp_path, ADAM_MULTISTEP)
    model, opt, sched = from_solver(path)
    w0, b0 = _wb(model)
    first = _loop(model, opt, sched, 6)
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, ckpt)
    sd = opt.state_dict()
    assert sd["caffe"] == {"iter": 6} and sched.current_step == 1
    assert {"exp_avg", "exp_avg_sq"} <= set(sd["state"][0])

    torch.manual_seed(123)  # the fresh trio's fillers differ: the state must bring everything back
    model2, opt2, sched2 = from_solver(path)
    loaded = torch.load(ckpt, weights_only=True)
    model2.load_state_dict(loaded["model"])
    opt2.load_state_dict(loaded["opt"])
    sched2.load_state_dict(loaded["sched"])
    assert opt2.iter == 6 and sched2.last_epoch == 6 and opt2.param_groups[0]["lr"] == pytest.approx(0.025)
    second = _loop(model2, opt2, sched2, 6)
    w, b, ref = numpy_train(w0, b0, "Adam", 12, base_lr=0.05, momentum=0.9, weight_decay=0.001, lr_at=_multistep)
    np.testing.assert_allclose(first + second, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_wb(model2)[0], w, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(_wb(model2)[1], b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fmt", [".solverstate", ".solverstate.h5"])
def test_solverstate_both_ways_with_caffeport_train(tmp_path: Path, fmt: str) -> None:
    """plain loop 6 its -> .solverstate -> caffeport train's Solver resumes to 12; and the Solver's own
    snapshot at 6 -> load_solverstate -> plain loop to 12: both end at the numpy model's weights."""
    path = write_case(tmp_path, ADAM_MULTISTEP)
    model, opt, sched = from_solver(path)
    w0, b0 = _wb(model)
    _loop(model, opt, sched, 6)
    state, cm = tmp_path / f"mine{fmt}", tmp_path / ("mine.caffemodel.h5" if fmt.endswith(".h5") else "mine.caffemodel")
    save_solverstate(state, model, opt, sched, caffemodel=cm)
    st = read_solverstate(state)
    assert st.iter == 6 and st.current_step == 1 and len(st.history) == 4 and st.learned_net == str(cm)
    w, b, _ = numpy_train(w0, b0, "Adam", 12, base_lr=0.05, momentum=0.9, weight_decay=0.001, lr_at=_multistep)

    solver = get_solver(path)
    feed(solver)
    solver.solve(resume_file=state)
    assert solver.iter == 12 and solver.current_step == 2
    np.testing.assert_allclose(solver.net.params["ip"][0].data, w, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(solver.net.params["ip"][1].data, b, rtol=1e-4, atol=1e-5)

    # the Solver's own snapshot at iteration 6 into a fresh plain loop
    first = get_solver(path)
    first.net.copy_from({"ip": [w0, b0]})
    feed(first)
    first.step(6)  # snapshot: 6 -> snap_iter_6.*
    model2, opt2, sched2 = from_solver(path)
    load_solverstate(tmp_path / "snap_iter_6.solverstate", model2, opt2, sched2)
    assert opt2.iter == 6 and sched2.last_epoch == 6 and sched2.current_step == 1
    _loop(model2, opt2, sched2, 6)
    assert sched2.solverstate_step == 2
    np.testing.assert_allclose(_wb(model2)[0], w, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(_wb(model2)[1], b, rtol=1e-4, atol=1e-5)


def test_optimizer_on_a_users_own_module() -> None:
    """caffeport.optim.SGD on a plain nn.Linear, Caffe's bias convention as param groups, a step lr
    policy through LRPolicy, L1 decay: equals the numpy model (torch.optim.SGD would not after the drop)."""
    lin = torch.nn.Linear(3, 2)
    w0, b0 = lin.weight.detach().numpy().copy(), lin.bias.detach().numpy().copy()
    param = caffe_pb2.SolverParameter(base_lr=0.1, momentum=0.9, weight_decay=0.02, regularization_type="L1",
                                      lr_policy="step", gamma=0.5, stepsize=4)
    opt = SGD([{"params": [lin.weight]}, {"params": [lin.bias], "lr_mult": 2.0, "decay_mult": 0.0}], param)
    sched = LRPolicy(opt, param)
    x, y = torch.from_numpy(X), torch.from_numpy(Y)
    for _ in range(12):
        opt.zero_grad()
        ((lin(x) - y) ** 2).sum().div(2 * len(x)).backward()
        opt.step()
        sched.step()
    w, b, _ = numpy_train(w0, b0, "SGD", 12, base_lr=0.1, momentum=0.9, weight_decay=0.02, reg="L1",
                          lr_at=lambda it: 0.1 * 0.5 ** (it // 4))
    np.testing.assert_allclose(lin.weight.detach().numpy(), w, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(lin.bias.detach().numpy(), b, rtol=1e-4, atol=1e-5)


def test_from_solver_model_and_frozen_blobs(tmp_path: Path) -> None:
    net = NET.replace("param { lr_mult: 2 decay_mult: 0 }", "param { lr_mult: 0 decay_mult: 1 }")
    path = write_case(tmp_path, 'base_lr: 0.1 momentum: 0.9 weight_decay: 0.01 lr_policy: "fixed"', net)
    model, opt, sched = caffeport.from_solver(path)
    assert isinstance(model, torch.nn.Module) and list(model.params) == ["ip"]
    w, bias = model.params["ip"]
    assert [p for g in opt.param_groups for p in g["params"]] == [w]  # the frozen bias is left out
    assert all(any(p is q for q in model.parameters()) for p in (w, bias))  # the same tensors
    b0, w0 = bias.detach().clone(), w.detach().clone()
    _loop(model, opt, sched, 2)
    assert torch.equal(bias, b0) and not torch.equal(w, w0)
    st = opt.to_solverstate(model.caffe_params())
    assert len(st.history) == 2 and not st.history[1].any()  # Caffe's layout keeps the frozen slot
    out = model(x=torch.from_numpy(X), y=torch.from_numpy(Y))
    expected = ((X @ w.detach().numpy().T + bias.detach().numpy() - Y) ** 2).sum() / (2 * len(X))
    assert float(model.loss(out).detach()) == pytest.approx(expected, rel=1e-5)


def test_errors(tmp_path: Path) -> None:
    lin = torch.nn.Linear(2, 2)
    with pytest.raises(CaffeportError, match="unknown argument 'betas'"):
        SGD(lin.parameters(), betas=(0.9, 0.99))
    with pytest.raises(CaffeportError, match="momentum cannot be used with AdaGrad"):
        AdaGrad(lin.parameters(), momentum=0.9)
    with pytest.raises(CaffeportError, match="'momentum' differs between param groups"):
        SGD([{"params": [lin.weight], "momentum": 0.5}, {"params": [lin.bias]}], momentum=0.9)
    opt = SGD(lin.parameters(), momentum=0.9)
    opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], "iter_size": 2})
    with pytest.raises(CaffeportError, match="'iter_size' differs between param groups"):
        opt.step()
    with pytest.raises(CaffeportError, match="unknown lr_policy \"cosine\""):
        LRPolicy(SGD(lin.parameters()), lr_policy="cosine")
    with pytest.raises(CaffeportError, match="solver file not found"):
        from_solver(tmp_path / "missing.prototxt")
    path = write_case(tmp_path, 'type: "Adamm" base_lr: 0.1 lr_policy: "fixed"')
    with pytest.raises(CaffeportError, match="unknown solver type \"Adamm\""):
        from_solver(path)
    model, opt, _ = from_solver(write_case(tmp_path, 'type: "Adam" base_lr: 0.1 lr_policy: "fixed"'))
    bad = opt.to_solverstate(model.caffe_params())
    bad.history = bad.history[:2]
    with pytest.raises(CaffeportError, match="incorrect length of history blobs"):
        opt.load_solverstate(bad, model.caffe_params())


def test_caffeport_train_runs_on_the_optimizer(tmp_path: Path) -> None:
    """One implementation: the Solver's update is its caffeport.optim optimizer's step, and the
    history it snapshots is that optimizer's state."""
    solver = get_solver(write_case(tmp_path, ADAM_MULTISTEP))
    assert isinstance(solver.optimizer, caffeport.optim.Adam)
    w = solver.net.params["ip"][0]
    w_param = solver.net.layer_dict["ip"].blobs[0]
    assert solver.history[0][0] is solver.optimizer.state[w_param]["exp_avg"]
    assert solver.history[1][0] is solver.optimizer.state[w_param]["exp_avg_sq"]
    feed(solver)
    before = w.data.copy()
    solver.step(1)
    assert solver.optimizer.iter == 1 and not np.array_equal(before, w.data)


def test_from_solver_stages_and_weights(tmp_path: Path) -> None:
    """``stages=`` selects layers as ``caffeport train --stage``; ``weights=`` copies by layer name."""
    net = NET + 'layer { name: "extra" type: "Power" bottom: "p" top: "p2" include { stage: "big" } }\n'
    path = write_case(tmp_path, 'base_lr: 0.1 lr_policy: "fixed"', net)
    plain, _, _ = from_solver(path)
    staged, _, _ = from_solver(path, stages=["big"])
    assert "extra" not in plain.net.layer_dict and "extra" in staged.net.layer_dict
    w = np.full((2, 3), 0.25, np.float32)
    caffeport.save_caffemodel({"ip": [w, np.zeros(2, np.float32)]}, tmp_path / "w.caffemodel")
    model, _, _ = from_solver(path, weights=tmp_path / "w.caffemodel")
    np.testing.assert_array_equal(model.params["ip"][0].detach().numpy(), w)

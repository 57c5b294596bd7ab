"""Fast mode (caffeport/fast.py): checked against Caffe's golden outputs; refusal and compile fallback."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import caffeport
from caffeport.errors import CaffeportError
from caffeport.fast import BF16_TOLERANCE, FastModeNotice, build_fast
from caffeport.passes import optimize_net
from tests.golden import assert_close, case_info, in_case, npz

NETS = ["net_resnet_bottleneck", "net_caffenet_mini", "net_googlenet_inception", "net_squeezenet_fire"]


def _golden_net(name: str) -> caffeport.Net:
    with in_case(name):
        return caffeport.Net("net.prototxt", "weights.caffemodel", caffeport.TEST)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(np.asarray(a, np.float64) - b).max() / max(np.abs(b).max(), 1e-30))


@pytest.mark.parametrize("name", NETS)
def test_fast_fp32_matches_caffe(name):
    info = case_info(name)
    net = _golden_net(name)
    fast = build_fast(net, compile=False, precision="fp32")
    assert fast.max_rel_error < 1e-5
    out = fast(**{k: torch.from_numpy(v) for k, v in npz(name, "inputs.npz").items()})
    ref = npz(name, "forward.npz")
    for k in info["outputs"]:
        assert_close(out[k].numpy(), ref[k], info["atol"], info["rtol"], f"fast {k}")


def test_fast_bf16_within_tolerance():
    name = "net_resnet_bottleneck"
    fast = build_fast(_golden_net(name), compile=False, precision="bf16")
    assert fast.precision == "bf16" and 0 < fast.max_rel_error <= BF16_TOLERANCE
    out = fast(**npz(name, "inputs.npz"))["res2a"].numpy()
    assert _rel(out, npz(name, "forward.npz")["res2a"]) < BF16_TOLERANCE


def test_broken_pass_is_refused():
    def broken(net):
        new, report = optimize_net(net)
        with torch.no_grad():
            new.params["res2a_branch2c"][0].data[...] *= 1.01  # a pass that gets the maths wrong
        return new, report

    with pytest.raises(CaffeportError, match=r"fast mode refused.*'res2a'.*max relative error .*tolerance"):
        build_fast(_golden_net("net_resnet_bottleneck"), compile=False, precision="fp32", passes=broken)


def test_compile_failure_falls_back_with_one_notice(monkeypatch):
    import caffeport.fast as fast_mod

    def no_compiler(module, cpp_wrapper=True):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(fast_mod, "_compile", no_compiler)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast = build_fast(_golden_net("net_resnet_bottleneck"), compile=True, precision="fp32")
        fast(**npz("net_resnet_bottleneck", "inputs.npz"))
    notices = [w for w in caught if issubclass(w.category, FastModeNotice)]
    assert len(notices) == 1 and "no C++ compiler found" in str(notices[0].message)
    assert not fast.compiled and fast.max_rel_error < 1e-5


def test_compiled_fast_matches_caffe():
    # The one real torch.compile of the suite (a tiny net: compiling is slow on 2 cores).
    from torch._inductor.utils import run_and_get_code

    name = "net_resnet_bottleneck"
    info = case_info(name)
    fast, codes = run_and_get_code(lambda: build_fast(_golden_net(name), compile=True, precision="fp32"))
    assert fast.compiled and fast.cpp_wrapper, fast.notices
    out = fast(**npz(name, "inputs.npz"))["res2a"].numpy()
    assert_close(out, npz(name, "forward.npz")["res2a"], info["atol"], info["rtol"], "compiled res2a")
    # The generated wrapper is C++, and with inductor's freezing the weights are graph constants, so
    # it calls oneDNN's prepacked convolutions fused with the ReLU, never aten's convolution.
    code = "\n".join(codes)
    calls = [ln for ln in code.splitlines() if "mkldnn__convolution_pointwise(" in ln]
    assert "AOTI_TORCH_ERROR_CODE_CHECK" in code and calls, code[:2000]
    assert all("_frozen_param" in ln for ln in calls) and any('"relu"' in ln for ln in calls)
    assert "aoti_torch_cpu_convolution(" not in code and "aten.convolution.default(" not in code
    # Frozen constants are per build: the same net with other weights, built after it, computes its own.
    other = _golden_net(name)
    with torch.no_grad():
        for p in other.module.parameters():
            p.mul_(-0.5)
        want = other.module(**{k: torch.from_numpy(v) for k, v in npz(name, "inputs.npz").items()})["res2a"]
    fast2 = build_fast(other, compile=True, precision="fp32")
    assert fast2.compiled and _rel(fast2(**npz(name, "inputs.npz"))["res2a"].numpy(), want.numpy()) < 1e-5


def test_net_and_load_module_fast(monkeypatch):
    monkeypatch.setenv("CAFFEPORT_NO_COMPILE", "1")
    name = "net_resnet_bottleneck"
    info = case_info(name)
    x = npz(name, "inputs.npz")["data"]
    ref = npz(name, "forward.npz")["res2a"]
    with in_case(name):
        net = caffeport.Net("net.prototxt", "weights.caffemodel", caffeport.TEST, fast=True)
        module = caffeport.load_module("net.prototxt", "weights.caffemodel", fast=True)
    out = net.forward(data=x)["res2a"]
    tol = 5e-2 if net._fast.precision == "bf16" else info["rtol"]
    assert _rel(out, ref) < max(tol, 1e-4)
    assert _rel(net.blobs["res2a"].data, ref) < max(tol, 1e-4)
    assert _rel(module(torch.from_numpy(x))["res2a"].numpy(), ref) < max(tol, 1e-4)
    with pytest.raises(CaffeportError, match="whole net only"):
        net.forward(end="res2a_branch1")
    with pytest.raises(CaffeportError, match="inference-only"):
        net.backward()


def _loss_line(text: str) -> float:
    import re

    return float(re.findall(r"\] loss = ([-0-9.e+]+) \(", text)[-1])


def test_cli_test_and_time_fast(monkeypatch):
    from click.testing import CliRunner

    from caffeport.cli import main

    monkeypatch.setenv("CAFFEPORT_NO_COMPILE", "1")
    runner = CliRunner()
    with in_case("solver_finetune_renamed_lmdb"):
        args = ["test", "--model", "train.prototxt", "--weights", "final.caffemodel", "--iterations", "2"]
        exact = runner.invoke(main, args)
        fast = runner.invoke(main, [*args, "--fast"])
    assert exact.exit_code == 0 and fast.exit_code == 0, fast.output
    assert "Fast mode:" in fast.output and "max relative error vs exact" in fast.output
    assert abs(_loss_line(fast.output) - _loss_line(exact.output)) <= BF16_TOLERANCE * abs(_loss_line(exact.output))
    with in_case("net_resnet_bottleneck"):
        timed = runner.invoke(main, ["time", "--model", "net.prototxt", "--fast", "--iterations", "2"])
    assert timed.exit_code == 0, timed.output
    assert "Average Forward pass" in timed.output and "Fast mode:" in timed.output


def _cast_shapes(fn) -> list[tuple[int, ...]]:
    """The shapes of the tensors cast (``aten::_to_copy``: autocast's casts) while ``fn`` runs."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    return [tuple(e.input_shapes[0]) for e in prof.events()
            if e.name == "aten::_to_copy" and e.input_shapes and e.input_shapes[0]]


def test_bf16_weights_stored_once_outputs_stay_fp32():
    # CaffeNet topology: convs, LRN, fc, SoftmaxWithLoss. Weight matrices/kernels are bf16 from the
    # build on; biases stay fp32; the loss comes back as fp32 and still matches Caffe's.
    name = "net_caffenet_mini"
    fast = build_fast(_golden_net(name), compile=False, precision="bf16")
    assert fast.weights_dtype == "bf16" and 0 < fast.max_rel_error <= BF16_TOLERANCE
    params = dict(fast.inner.named_parameters())
    assert {str(p.dtype) for p in params.values() if p.dim() >= 2} == {"torch.bfloat16"}
    assert {str(p.dtype) for p in params.values() if p.dim() == 1} == {"torch.float32"}
    weight_shapes = {tuple(p.shape) for p in params.values() if p.dim() >= 2}
    inputs = npz(name, "inputs.npz")
    casts = _cast_shapes(lambda: fast(**inputs))
    assert casts, "the profiler saw no cast at all (it would not see weight casts either)"
    assert not weight_shapes & set(casts), "a weight was re-cast during the call"
    out = fast(**inputs)
    assert out["loss"].dtype == torch.float32
    assert _rel(out["loss"].numpy(), npz(name, "forward.npz")["loss"]) < BF16_TOLERANCE


def test_bf16_weights_fall_back_to_fp32_storage_with_one_notice(monkeypatch):
    import caffeport.fast as fast_mod

    real_check = fast_mod._check

    def bf16_params_break(fast, *args):  # as a layer whose forward cannot take bf16 parameters
        if fast.weights_dtype == "bf16":
            raise RuntimeError("expected scalar type Float but found BFloat16")
        return real_check(fast, *args)

    monkeypatch.setattr(fast_mod, "_check", bf16_params_break)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast = build_fast(_golden_net("net_caffenet_mini"), compile=False, precision="bf16")
    notices = [str(w.message) for w in caught if issubclass(w.category, FastModeNotice)]
    assert len(notices) == 1 and "found BFloat16" in notices[0] and "fp32 weights" in notices[0]
    assert fast.weights_dtype == "fp32" and fast.precision == "bf16"
    assert {p.dtype for p in fast.inner.parameters()} == {torch.float32}
    out = fast(**npz("net_caffenet_mini", "inputs.npz"))["loss"].numpy()
    assert _rel(out, npz("net_caffenet_mini", "forward.npz")["loss"]) < BF16_TOLERANCE


def test_cpp_wrapper_failure_falls_back_to_the_python_wrapper_silently(monkeypatch):
    import caffeport.fast as fast_mod

    real = fast_mod._compile

    def no_cpp_wrapper(module, cpp_wrapper=True):
        if cpp_wrapper:
            raise RuntimeError("C++ wrapper: unsupported op")
        return real(module, cpp_wrapper=False)

    monkeypatch.setattr(fast_mod, "_compile", no_cpp_wrapper)
    name = "net_resnet_bottleneck"
    info = case_info(name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast = build_fast(_golden_net(name), compile=True, precision="fp32")
    assert not [w for w in caught if issubclass(w.category, FastModeNotice)]
    assert fast.compiled and not fast.cpp_wrapper and "Python wrapper" in fast.notices[0]
    out = fast(**npz(name, "inputs.npz"))["res2a"].numpy()
    assert_close(out, npz(name, "forward.npz")["res2a"], info["atol"], info["rtol"], "compiled res2a")

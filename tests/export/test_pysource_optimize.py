"""``export-torch --python --optimize``: the generated source of the net after the graph passes
(caffeport/passes.py: BatchNorm/Scale folded into convs, TEST Dropout into the fc), imported in a fresh
interpreter where caffeport cannot be imported, compared with Caffe's recorded outputs (goldens) and
with the exact caffeport forward (within OPTIMIZE_TOL = 1e-4 relative); fewer layers than the plain
export; nets with nothing to fold still export."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import caffeport
import caffeport.passes
from caffeport.cli import main
from caffeport.errors import CaffeportError
from caffeport.export.common import randomize_weights
from caffeport.export.onnx import rel_error
from caffeport.export.pysource import OPTIMIZE_TOL, export_python, load_generated
from caffeport.io import read_net
from caffeport.net import Net
from caffeport.surgery import truncate
from tests.export.test_pysource import RUNNER, _golden_net
from tests.golden import CORPUS, REPO, assert_close, case_info, in_case, npz
from tests.test_passes import _random_bn_stats

# golden case -> layers the passes remove (BatchNorm + Scale pairs; TEST Dropout folded into fc)
GOLDEN = {"net_resnet_bottleneck": 8, "net_caffenet_mini": 2, "batchnorm_global_stats": 0}
RESNET50 = "3_model_zoo/resnet_KaimingHe/prototxt/ResNet-50-deploy.prototxt"
LENET = "2_bvlc_caffe/head/examples/mnist/lenet.prototxt"  # no BatchNorm/Scale/Dropout at all


def _resnet50() -> Net:
    """ResNet-50 (corpus deploy net) cut at fc1000 (before the softmax hides differences), random
    weights and random plausible BatchNorm statistics / Scale parameters, batch 1 at 224 x 224."""
    path = CORPUS / RESNET50
    cut, _ = truncate(read_net(path), "fc1000", source=RESNET50)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = Net(cut, root=path.parent)
    net.source = RESNET50
    randomize_weights(net, 0)
    _random_bn_stats(net, 3)
    return net


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Each net written plain and optimized, all run once in one fresh interpreter."""
    d = tmp_path_factory.mktemp("pysource_opt")
    entries: dict[str, dict] = {}
    jobs = []

    def add(module: str, net: Net, feeds: dict[str, np.ndarray], golden: str | None, optimize: bool) -> None:
        res = export_python(net, d / f"{module}.py", feeds=feeds, optimize=optimize)
        with torch.no_grad():
            table = net.module.run({k: torch.from_numpy(v) for k, v in feeds.items()})
        np.savez(d / f"{module}_in.npz", **feeds)
        entries[module] = {"net": net, "golden": golden, "report": res.report, "error": res.error,
                           "want": {o: table[o].detach().numpy().copy() for o in net.outputs}}
        jobs.append({"module": module})

    for i, name in enumerate(GOLDEN):
        net = _golden_net(name)
        inputs = npz(name, "inputs.npz")
        feeds = {k: inputs[k].astype(np.float32) for k in net.inputs}
        add(f"golden_{i}", net, feeds, name, False)
        add(f"golden_{i}_opt", net, feeds, name, True)
    rng = np.random.default_rng(0)
    for i, net in enumerate([_resnet50(), Net(CORPUS / LENET, root=(CORPUS / LENET).parent)]):
        if net.source != RESNET50:
            net.source = LENET
            randomize_weights(net, 1)
        feeds = {n: rng.standard_normal(net._shapes[n]).astype(np.float32) for n in net.inputs}
        add(f"corpus_{i}", net, feeds, None, False)
        add(f"corpus_{i}_opt", net, feeds, None, True)
    (d / "jobs.json").write_text(json.dumps(jobs))
    (d / "runner.py").write_text(RUNNER)
    res = subprocess.run([sys.executable, "-I", str(d / "runner.py"), str(d), str(REPO)], capture_output=True,
                         text=True, timeout=300, cwd=d)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout.strip().splitlines()[-1])
    outs = {}
    for module in entries:
        with np.load(d / f"{module}_out.npz") as f:
            outs[module] = {k: f[k] for k in f.files}
    return d, entries, report, outs


def _layers(d: Path, module: str) -> dict[str, str]:
    return load_generated((d / f"{module}.py").read_text()).CAFFE_LAYERS


def test_ran_without_caffeport(exported) -> None:
    _, entries, report, _ = exported
    assert report.pop("caffeport_importable") is False
    assert set(report) == set(entries) and not any(r["training"] for r in report.values())


def test_golden_cases_optimized_match_caffe(exported) -> None:
    d, entries, _, outs = exported
    for i, (name, removed) in enumerate(GOLDEN.items()):
        info = case_info(name)
        ref = npz(name, "forward.npz")
        module = f"golden_{i}_opt"
        got = outs[module]
        assert set(got) == set(entries[module]["want"]) and set(got) <= set(ref), name  # a loss net is cut
        for blob, value in got.items():
            assert rel_error(value, entries[module]["want"][blob]) <= OPTIMIZE_TOL, f"{name}: {blob} vs exact"
            assert_close(value, ref[blob], info["atol"], info["rtol"], f"{name} optimized: {blob} vs Caffe")
        rep = entries[module]["report"]
        assert len(rep.folded) + len(rep.dropped) == removed, (name, rep.summary())
        assert len(_layers(d, module)) == len(_layers(d, f"golden_{i}")) - removed, name


def test_bottleneck_source_has_no_batchnorm_or_scale(exported) -> None:
    d, _, _, _ = exported
    plain, opt = (d / "golden_0.py").read_text(), (d / "golden_0_opt.py").read_text()
    assert "nn.BatchNorm2d(" in plain or "CaffeBatchNorm(" in plain  # the plain export keeps them
    names = set(_layers(d, "golden_0_opt").values())
    assert not any(n.startswith(("bn", "scale")) for n in names), names
    assert "BatchNorm" not in opt.split("class Net(", 1)[1] and "Scale(" not in opt.split("class Net(", 1)[1]
    assert opt.count("nn.Conv2d(") == plain.count("nn.Conv2d(") == 4
    assert "Optimized (caffeport.passes): 17 -> 9 layers" in opt


def test_resnet50_optimized_matches_exact(exported) -> None:
    d, entries, _, outs = exported
    e = entries["corpus_0_opt"]
    assert len(e["report"].folded) == 106  # 53 BatchNorm + 53 Scale
    assert len(_layers(d, "corpus_0_opt")) == len(_layers(d, "corpus_0")) - 106
    err = rel_error(outs["corpus_0_opt"]["fc1000"], e["want"]["fc1000"])
    assert 0 < err <= OPTIMIZE_TOL  # folding changes fp32 rounding, not the maths
    assert rel_error(outs["corpus_0"]["fc1000"], entries["corpus_0"]["want"]["fc1000"]) <= 1e-5


def test_nothing_to_fold_still_exports(exported) -> None:
    d, entries, _, outs = exported
    e = entries["corpus_1_opt"]
    assert e["report"].folded == [] and e["report"].dropped == []
    assert _layers(d, "corpus_1_opt") == _layers(d, "corpus_1")
    assert rel_error(outs["corpus_1_opt"]["prob"], e["want"]["prob"]) <= 1e-6


def test_ruff_passes_on_optimized_code(exported) -> None:
    d, entries, _, _ = exported
    ruff = Path(sys.executable).parent / "ruff"
    res = subprocess.run([str(ruff), "check", "--config", str(REPO / "pyproject.toml"),
                          *[str(d / f"{m}.py") for m in entries if m.endswith("_opt")]], capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stdout[-3000:]


def test_a_wrong_fold_is_refused(tmp_path, monkeypatch) -> None:
    """The optimized module is checked against the exact net, not against the folded one."""
    real = caffeport.passes.optimize_net

    def off_by_a_percent(net, **kw):
        new, report = real(net, **kw)
        new.params["res2a_branch2c"][0].data[...] *= 1.01
        return new, report

    monkeypatch.setattr(caffeport.passes, "optimize_net", off_by_a_percent)
    with pytest.raises(CaffeportError, match=r"output 'res2a' differs from caffeport's forward"):
        export_python(_golden_net("net_resnet_bottleneck"), tmp_path / "bad.py", optimize=True)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("form", ["--python", "--torchscript"])
def test_cli_optimize_matches_caffe(tmp_path, form: str) -> None:
    name = "net_resnet_bottleneck"
    info = case_info(name)
    out = tmp_path / ("opt.py" if form == "--python" else "opt.ts")
    with in_case(name):
        r = CliRunner().invoke(main, ["export-torch", "net.prototxt", "-w", "weights.caffemodel", form,
                                      "-o", str(out), "--optimize"])
    assert r.exit_code == 0, r.output
    assert "optimized: 17 -> 9 layers: 8 folded into conv/fc" in r.output
    x = torch.from_numpy(npz(name, "inputs.npz")["data"])
    with torch.no_grad():
        if form == "--python":
            m = load_generated(out.read_text()).Net().eval()
            m.load_state_dict(torch.load(out.with_suffix(".pt"), weights_only=True))
            got = m(x)["res2a"].numpy()
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.load's deprecation note
                got = torch.jit.load(str(out))(x)
            got = (got[0] if isinstance(got, tuple) else got).numpy()
    assert_close(got, npz(name, "forward.npz")["res2a"], info["atol"], info["rtol"], f"export-torch {form} --optimize")


def test_cli_optimize_refuses_a_state_dict(tmp_path) -> None:
    with in_case("net_resnet_bottleneck"):
        r = CliRunner().invoke(main, ["export-torch", "net.prototxt", "-w", "weights.caffemodel", "-o",
                                      str(tmp_path / "w.pt"), "--optimize"])
    assert r.exit_code != 0 and "--optimize changes the layers" in r.output
    assert not (tmp_path / "w.pt").exists()


def test_optimize_needs_a_test_net(tmp_path) -> None:
    with in_case("net_resnet_bottleneck") as d:
        net = Net(d / "net.prototxt", phase=caffeport.TRAIN)
    with pytest.raises(CaffeportError, match="TEST-phase"):
        export_python(net, tmp_path / "m.py", optimize=True)
    assert list(tmp_path.iterdir()) == []

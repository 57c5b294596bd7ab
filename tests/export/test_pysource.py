"""Generated PyTorch source (export-torch --python): golden nets and layers, and a sample of corpus
deploy nets, written as modules, imported in a fresh interpreter where caffeport cannot be imported,
compared with Caffe's recorded outputs (goldens) and caffeport's forward; ruff on the files;
gradients through them; torch.compile on one."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from caffeport.cli import main
from caffeport.errors import CaffeportError
from caffeport.export.common import randomize_weights
from caffeport.export.onnx import rel_error
from caffeport.export.pysource import NoSourceForm, export_python, generate_source
from caffeport.io import read_net
from caffeport.net import Net
from caffeport.surgery import truncate
from tests.export.test_onnx import _rel, _small_message
from tests.golden import CORPUS, REPO, case_info, cases, in_case, npz

# Golden forward cases with no generated form even cut at the loss input: {case: type named}.
NO_PY_FORM = {
    "accuracy_topk_ignore_perclass": "Accuracy",
    "dummydata_constant": "DummyData",
    "python_layer": "Python",
}

# Corpus deploy nets generated here: a sample across families, cheap at the ONNX test's sizes (GoogLeNet
# and ResNet are covered by the net_googlenet_inception / net_resnet_bottleneck goldens).
CORPUS_SAMPLE = [
    "2_bvlc_caffe/head/examples/mnist/lenet.prototxt",
    "2_bvlc_caffe/head/examples/cifar10/cifar10_full.prototxt",
    "2_bvlc_caffe/head/examples/siamese/mnist_siamese.prototxt",
    "2_bvlc_caffe/legacy_v0_2014-03/examples/lenet/lenet.prototxt",
    "3_model_zoo/mobilenet_shicai/mobilenet_v2_deploy.prototxt",
    "3_model_zoo/shufflenet_farmingyard/shufflenet_1x_g3_deploy.prototxt",
    "3_model_zoo/squeezenet_forresti/SqueezeNet_v1.1/deploy.prototxt",
    "4_real_caffemodels/mtcnn_kpzhang93/code/codes/MTCNNv2/model/det3.prototxt",
    "4_real_caffemodels/ultraface_linzaer/caffe/model/RFB-320/RFB-320.prototxt",
    "4_real_caffemodels/vanillacnn_ishay2b/ZOO/vanilla_deploy.prototxt",
    # SSD face detector: Normalize, Permute, PriorBox, Flatten, Concat, DetectionOutput (29 boxes
    # survive NMS with these random weights)
    "4_real_caffemodels/libfacedetection_yufacedetectnet/models/caffe/yufacedetectnet-open-v1.prototxt",
    # Fast R-CNN (ZF) with 8 ROIs, some partly outside the map: ROIPooling
    "3_model_zoo/py_faster_rcnn/models/pascal_voc/ZF/fast_rcnn/test.prototxt",
]
N_ROIS = 8
TRAINED = {"tiny": "2_bvlc_caffe/head/examples/mnist/lenet.prototxt"}  # backward + torch.compile


def _golden_forward_cases() -> list[str]:
    return [n for n in cases("forward") if case_info(n).get("phase", "TEST") == "TEST"]


def _golden_net(name: str) -> Net:
    """The case's TEST net with Caffe's weights; a net ending in a loss is cut at its input."""
    with in_case(name) as d:
        weights = d / "weights.caffemodel" if (d / "weights.caffemodel").exists() else None
        net = Net(d / "net.prototxt", weights)
        losses = [lay for lay in net.layers if lay.is_loss]
        if losses:
            cut, _ = truncate(read_net(d / "net.prototxt"), losses[0].param.bottom[0])
            net = Net(cut, root=d)
            if weights:
                net.copy_from(weights)
        net.source = name
        return net


def _corpus_net(rel: str) -> Net:
    from caffeport.export.common import set_input_shapes

    path = CORPUS / rel
    msg = _small_message(path)
    if any(t == "rois" for lp in msg.layer if lp.type == "Input" for t in lp.top):
        set_input_shapes(msg, {"rois": (N_ROIS, 5)}, rel)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = Net(msg, root=path.parent)
    net.source = rel
    randomize_weights(net, 0)
    return net


RUNNER = textwrap.dedent('''
    import json, math, sys
    sys.modules["caffeport"] = None          # any import of caffeport fails from here on
    repo = sys.argv[2]
    sys.path[:] = [p for p in sys.path if p not in ("", ".", repo) and not p.startswith(repo + "/tests")]
    sys.path.insert(0, sys.argv[1])
    import numpy as np
    import torch
    jobs = json.loads(open(sys.argv[1] + "/jobs.json").read())
    report = {}
    for job in jobs:
        mod = __import__(job["module"])
        m = mod.load()
        with np.load(sys.argv[1] + "/" + job["module"] + "_in.npz") as f:
            feeds = {k: torch.from_numpy(f[k]) for k in f.files}
        args = [feeds[n] for n in mod.INPUTS]
        with torch.no_grad():
            out = m(*args)
        np.savez(sys.argv[1] + "/" + job["module"] + "_out.npz", **{k: v.numpy() for k, v in out.items()})
        r = {"training": m.training, "keys": list(out)}
        if job.get("train"):
            kw = {name: feeds[name] for name in mod.INPUTS}   # m(data=x)
            out = m(**kw)
            loss = sum((v * torch.linspace(-1, 1, v.numel()).reshape(v.shape)).sum() for v in out.values())
            loss.backward()
            grads = [p.grad for p in m.parameters()]
            r["grads"] = len(grads)
            r["grads_finite"] = all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
            r["grads_nonzero"] = sum(bool(g is not None and g.abs().sum() > 0) for g in grads)
            compiled = torch.compile(m)
            with torch.no_grad():
                got = compiled(**kw)
                ref = m(**kw)
            r["compile_err"] = max(float((got[k] - ref[k]).abs().max()) for k in ref)
        report[job["module"]] = r
    try:
        import caffeport  # noqa: F401
        report["caffeport_importable"] = True
    except ImportError:
        report["caffeport_importable"] = False
    print(json.dumps(report))
''')


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """Every module written, run once in one fresh interpreter; {module: (net, feeds, want, job)}."""
    d = tmp_path_factory.mktemp("pysource")
    entries: dict[str, dict] = {}
    jobs = []

    def add(module: str, net: Net, feeds: dict[str, np.ndarray], golden: str | None = None,
            train: bool = False) -> None:
        export_python(net, d / f"{module}.py", feeds=feeds)
        with torch.no_grad():
            table = net.module.run({k: torch.from_numpy(v) for k, v in feeds.items()})
        want = {o: table[o].detach().numpy().copy() for o in net.outputs}
        np.savez(d / f"{module}_in.npz", **feeds)
        entries[module] = {"net": net, "want": want, "golden": golden}
        jobs.append({"module": module, "train": train})

    for i, name in enumerate(_golden_forward_cases()):
        if name in NO_PY_FORM:
            continue
        net = _golden_net(name)
        inputs = npz(name, "inputs.npz")
        add(f"golden_{i}", net, {k: inputs[k].astype(np.float32) for k in net.inputs}, golden=name)
    rng = np.random.default_rng(0)
    for i, rel in enumerate(CORPUS_SAMPLE):
        net = _corpus_net(rel)
        feeds = {n: rng.standard_normal(net._shapes[n]).astype(np.float32) for n in net.inputs}
        if "rois" in feeds:  # [batch 0, x1, y1, x2, y2] around the 64 x 64 image
            x1, y1 = rng.uniform(-5, 60, N_ROIS), rng.uniform(-5, 60, N_ROIS)
            feeds["rois"] = np.stack([np.zeros(N_ROIS), x1, y1, x1 + rng.uniform(-3, 40, N_ROIS),
                                      y1 + rng.uniform(0, 40, N_ROIS)], 1).astype(np.float32)
        add(f"corpus_{i}", net, feeds, train=rel == TRAINED["tiny"])
    (d / "jobs.json").write_text(json.dumps(jobs))
    (d / "runner.py").write_text(RUNNER)
    res = subprocess.run([sys.executable, "-I", str(d / "runner.py"), str(d), str(REPO)], capture_output=True,
                         text=True, timeout=300, cwd=d)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout.strip().splitlines()[-1])
    return d, entries, report


def test_caffeport_was_not_importable(generated) -> None:
    _, entries, report = generated
    assert report.pop("caffeport_importable") is False
    assert set(report) == set(entries)


def test_golden_cases_match_caffe_and_caffeport(generated) -> None:
    d, entries, report = generated
    checked = 0
    for module, e in entries.items():
        if e["golden"] is None:
            continue
        name = e["golden"]
        info = case_info(name)
        ref = npz(name, "forward.npz")
        atol, rtol = max(info.get("atol", 1e-5), 1e-5), max(info.get("rtol", 1e-4), 1e-4)
        assert report[module]["training"] is False
        with np.load(d / f"{module}_out.npz") as f:
            got = {k: f[k] for k in f.files}
        assert set(got) == set(e["want"]), name
        for blob, value in got.items():
            assert rel_error(value, e["want"][blob]) <= 1e-5, f"{name}: {blob} vs caffeport"
            np.testing.assert_allclose(value, ref[blob], atol=atol, rtol=rtol, err_msg=f"{name}: {blob} vs Caffe")
        checked += 1
    assert checked >= 70 and any(entries[m]["golden"].startswith("net_") for m in entries if entries[m]["golden"])


def test_corpus_sample_matches_caffeport(generated) -> None:
    d, entries, _ = generated
    corpus = [m for m, e in entries.items() if e["golden"] is None]
    assert len(corpus) == len(CORPUS_SAMPLE)
    for module in corpus:
        with np.load(d / f"{module}_out.npz") as f:
            for blob, want in entries[module]["want"].items():
                err = rel_error(f[blob], want)
                assert err <= 1e-5, f"{entries[module]['net'].source}: {blob} relative error {err:.3g}"


def test_generated_code_trains_and_compiles(generated) -> None:
    _, entries, report = generated
    (module,) = [m for m, e in entries.items() if e["net"].source == TRAINED["tiny"]]
    r = report[module]
    assert r["grads"] == 8 and r["grads_finite"] and r["grads_nonzero"] == 8  # lenet: 4 layers x (w, b)
    assert r["compile_err"] <= 1e-5


def test_ruff_passes_on_generated_code(generated) -> None:
    d, entries, _ = generated
    ruff = Path(sys.executable).parent / "ruff"
    res = subprocess.run([str(ruff), "check", "--config", str(REPO / "pyproject.toml"),
                          *[str(d / f"{m}.py") for m in entries]], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:]


def test_generated_source_uses_torch_nn_where_exact(generated) -> None:
    d, entries, _ = generated
    (module,) = [m for m, e in entries.items() if e["golden"] == "net_caffenet_mini"]
    src = (d / f"{module}.py").read_text()
    assert "class Net(nn.Module):" in src and "def load(" in src
    for std in ("nn.Conv2d(3, 16, kernel_size=11, stride=4)", "nn.Linear(216, 64)", "nn.ReLU()",
                "nn.MaxPool2d(3, stride=2, ceil_mode=True)", "nn.LocalResponseNorm(5, alpha=0.0001, beta=0.75, k=1.0)"):
        assert std in src, std
    imports = [ln for ln in src.splitlines() if ln.startswith(("import ", "from "))]
    assert all(ln.split()[1].split(".")[0] in {"math", "pathlib", "torch"} for ln in imports), imports
    state = torch.load(d / f"{module}.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())


@pytest.mark.parametrize("name,what", sorted(NO_PY_FORM.items()))
def test_no_form_cases_name_the_layer(name: str, what: str) -> None:
    from caffeport.layers.base import allow_python_layers

    with allow_python_layers(), pytest.raises(NoSourceForm, match=rf"'[^']+' \({what}\)"):
        generate_source(_golden_net(name))


def test_no_form_cases_are_golden_forward_cases() -> None:
    assert set(NO_PY_FORM) <= set(_golden_forward_cases())


# --------------------------------------------------------------------------------------------------
# Caffe rules the generated helpers carry, against loop references written here
# --------------------------------------------------------------------------------------------------
def test_pooling_helpers_follow_caffe_rules() -> None:
    """CEIL rounding, pad clipping and the AVE divisor (the cases of the ONNX test's loop reference),
    on both the nn.MaxPool2d/AvgPool2d path and the CaffePool2d helper."""
    from caffeport.export.pysource import load_generated
    from tests.export.helpers import net_from_text
    from tests.export.test_onnx import POOL_CASES, caffe_pool_reference

    rng = np.random.default_rng(1)
    kinds = set()
    for method in ("MAX", "AVE"):
        for H, W, k, s, p in POOL_CASES:
            net = net_from_text(f"""
                layer {{ name: "data" type: "Input" top: "data"
                         input_param {{ shape {{ dim: 2 dim: 3 dim: {H} dim: {W} }} }} }}
                layer {{ name: "pool" type: "Pooling" bottom: "data" top: "pool"
                         pooling_param {{ pool: {method} kernel_size: {k} stride: {s} pad: {p} }} }}""")
            gen = generate_source(net)
            kinds.add("CaffePool2d(" in gen.source)
            m = load_generated(gen.source).Net().eval()
            x = rng.standard_normal((2, 3, H, W)).astype(np.float32)
            got = m(torch.from_numpy(x))["pool"].numpy()
            np.testing.assert_allclose(got, caffe_pool_reference(x, method, k, s, p), rtol=1e-6, atol=1e-6,
                                       err_msg=f"{method} {(H, W, k, s, p)}")
    assert kinds == {True, False}


# --------------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------------
def test_cli_writes_module_and_weights_for_a_train_val_net(tmp_path) -> None:
    lenet = CORPUS / "2_bvlc_caffe" / "head" / "examples" / "mnist" / "lenet_train_test.prototxt"
    out = tmp_path / "mynet.py"
    r = CliRunner().invoke(main, ["export-torch", str(lenet), "--python", "-o", str(out),
                                  "--input-shape", "data:2,1,28,28"])
    assert r.exit_code == 0, r.output
    assert out.exists() and (tmp_path / "mynet.pt").exists()
    src = out.read_text()
    assert "self.loss" not in src and "'prob': prob" in src  # the deploy form: SoftmaxWithLoss -> prob
    assert "self.accuracy" not in src
    r = CliRunner().invoke(main, ["export-torch", str(lenet), "--python", "-o", str(tmp_path / "my-net.py"),
                                  "--input-shape", "data:2,1,28,28"])
    assert r.exit_code != 0 and "importable module name" in r.output


def test_cli_names_layers_without_a_form(tmp_path) -> None:
    from caffeport.layers.base import allow_python_layers

    with in_case("python_layer") as d, allow_python_layers():
        r = CliRunner().invoke(main, ["export-torch", str(d / "net.prototxt"), "--python", "-o",
                                      str(tmp_path / "m.py")])
    assert r.exit_code != 0
    assert "'affine' (Python)" in r.output and not (tmp_path / "m.py").exists()
    with allow_python_layers(), pytest.raises(CaffeportError, match="no plain-PyTorch form"):
        export_python(_golden_net("python_layer"), tmp_path / "p.py")


def test_corpus_sample_names_corpus_nets() -> None:
    assert {_rel(CORPUS / r) for r in CORPUS_SAMPLE} == set(CORPUS_SAMPLE)
    assert all((CORPUS / r).exists() for r in CORPUS_SAMPLE)


@pytest.mark.parametrize("kind", ["LSTM", "RNN"])
def test_recurrent_static_input_and_exposed_state(kind: str) -> None:
    """The LSTM/RNN paths the goldens do not reach: a static input and exposed h0 (c0) / hT (cT),
    with a mid-sequence reset (cont 0), against caffeport's layer."""
    from tests.export.helpers import net_from_text

    states = ["h0", "c0"] if kind == "LSTM" else ["h0"]
    shape = "shape { dim: 1 dim: 2 dim: 4 }"
    inputs = "".join(f'layer {{ name: "{s}" type: "Input" top: "{s}" input_param {{ {shape} }} }}\n' for s in states)
    bottoms = " ".join(f'bottom: "{s}"' for s in states)
    tops = " ".join(f'top: "{s}T"' for s in states)
    net = net_from_text(f"""
        layer {{ name: "x" type: "Input" top: "x" input_param {{ shape {{ dim: 5 dim: 2 dim: 3 }} }} }}
        layer {{ name: "cont" type: "Input" top: "cont" input_param {{ shape {{ dim: 5 dim: 2 }} }} }}
        layer {{ name: "xs" type: "Input" top: "xs" input_param {{ shape {{ dim: 2 dim: 6 }} }} }}
        {inputs}
        layer {{ name: "rec" type: "{kind}" bottom: "x" bottom: "cont" bottom: "xs" {bottoms} top: "y" {tops}
                 recurrent_param {{ num_output: 4 expose_hidden: true }} }}""")
    rng = np.random.default_rng(2)
    feeds = {n: rng.standard_normal(net._shapes[n]).astype(np.float32) for n in net.inputs}
    feeds["cont"] = np.array([[0, 0], [1, 1], [1, 0], [1, 1], [0, 1]], np.float32)
    gen = generate_source(net)
    assert f"Caffe{kind}(3, 4, static_dim=6, expose_hidden=True)" in gen.source
    from caffeport.export.pysource import check_generated

    assert check_generated(gen, net, feeds=feeds) <= 1e-6
    assert set(net.outputs) == {"y", *[f"{s}T" for s in states]}


def test_names_become_identifiers_with_a_mapping() -> None:
    """Caffe names that are not Python identifiers, keywords, nn.Module members or helper names."""
    from caffeport.export.pysource import load_generated
    from tests.export.helpers import net_from_text

    net = net_from_text("""
        layer { name: "in" type: "Input" top: "class" input_param { shape { dim: 2 dim: 3 } } }
        layer { name: "1-fc/a" type: "InnerProduct" bottom: "class" top: "F" inner_product_param { num_output: 4 } }
        layer { name: "train" type: "ReLU" bottom: "F" top: "F" }
        layer { name: "Scale" type: "Scale" bottom: "F" top: "out/1" scale_param { bias_term: true } }""")
    gen = generate_source(net)
    mod = load_generated(gen.source)
    assert mod.CAFFE_LAYERS == {"layer_1_fc_a": "1-fc/a", "train_": "train", "Scale": "Scale"}
    m = mod.Net()
    m.load_state_dict(gen.state_dict)
    x = torch.randn(2, 3)
    got = m.eval()(class_=x)["out/1"]
    w, b = (t.detach() for t in net.layers[1].blobs)
    s, sb = (t.detach() for t in net.layers[3].blobs)
    torch.testing.assert_close(got, torch.relu(x @ w.T + b) * s + sb, rtol=1e-6, atol=1e-6)


def test_fork_layers_against_caffeport() -> None:
    """Fork layers the goldens and the corpus sample do not reach: PSPNet BN and Interp (crop +
    zoom), SegNet Upsample through a MAX-pool mask, per-channel SSD Normalize, depthwise conv."""
    from caffeport.export.pysource import check_generated
    from tests.export.helpers import net_from_text

    net = net_from_text("""
        layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 4 dim: 9 dim: 9 } } }
        layer { name: "dw" type: "ConvolutionDepthwise" bottom: "data" top: "dw"
                convolution_param { num_output: 4 kernel_size: 3 pad: 1 } }
        layer { name: "bn" type: "BN" bottom: "dw" top: "bn" }
        layer { name: "pool" type: "Pooling" bottom: "bn" top: "pool" top: "mask"
                pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
        layer { name: "up" type: "Upsample" bottom: "pool" bottom: "mask" top: "up"
                upsample_param { upsample_h: 9 upsample_w: 9 } }
        layer { name: "interp" type: "Interp" bottom: "up" top: "interp"
                interp_param { zoom_factor: 3 pad_beg: -1 pad_end: -2 } }
        layer { name: "norm" type: "Normalize" bottom: "interp" top: "norm"
                norm_param { across_spatial: false channel_shared: false } }""")
    gen = generate_source(net)
    for helper in ("PSPBatchNorm(", "CaffePool2d(", "Upsample((9, 9))", "Interp(", "L2Normalize(False"):
        assert helper in gen.source, helper
    assert "nn.Conv2d(4, 4, kernel_size=3, padding=1, groups=4)" in gen.source
    assert check_generated(gen, net, seed=3) <= 1e-6

"""Every deploy net of the corpus builds with caffeport (TEST phase), and computes what OpenCV's
independent Caffe importer computes: net outputs and pooling tops, on random weights (saved by caffeport
to a caffemodel that OpenCV reads too) or on the real trained weights where the corpus has them.

Large nets run at a smaller input (same architecture, smaller feature maps and fc fan-ins) so that the
whole file stays around a minute on two cores. Nets OpenCV cannot load or run are listed, with the
reason, in the terminal summary (tests/corpus/conftest.py), not skipped one by one.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from caffeport.errors import CaffeportError
from caffeport.io import save_caffemodel
from caffeport.layers.base import registry
from caffeport.layers.python import python_equivalent
from tests.corpus.common import (
    CORPUS,
    CV2_MISSING,
    REAL,
    build,
    cv2_caffe,
    cv_cannot_load,
    cv_forward,
    deploy_nets,
    input_shapes,
    n_params,
    producer,
    random_weights,
    read_quiet,
    rel_err,
)

DEPLOY = deploy_nets()
pytestmark = pytest.mark.xdist_group("corpus_deploy_nets")  # one worker: REPORT and test_summary see all nets
TOL = 1e-4  # max |caffeport - OpenCV| / max |OpenCV|

# Layer types that corpus deploy nets use and caffeport does not register, each with why (empty since the
# fork layers landed: SSD's DetectionOutput/PriorBox/Permute/Normalize, PSPNet's BN/Interp, ShuffleNet's
# ConvolutionDepthwise/ShuffleChannel). A net using a type missing from caffeport and from this list fails
# test_deploy_net; a type listed here that gets registered fails test_expected_unsupported_is_current.
EXPECTED_UNSUPPORTED: dict[str, str] = {}
# Python layers whose module is not part of the corpus: the build must name the module.
# (py-faster-rcnn's rpn.proposal_layer has a built-in equivalent, caffeport/layers/proposal.py: it builds
# without allow_python_layers, so it is no longer listed here.)
EXPECTED_MISSING_PYTHON_MODULES: dict[str, str] = {}
# Nets that only run single-image batches (py-faster-rcnn's proposal layer asserts batch 1): compared at batch 1.
SINGLE_IMAGE_NETS = {
    f"3_model_zoo/py_faster_rcnn/models/pascal_voc/{arch}/faster_rcnn_end2end/test.prototxt":
        "rpn.proposal_layer.ProposalLayer supports one image per batch" for arch in ("ZF", "VGG16")
}

# Real trained weights for deploy nets (prototxt -> caffemodel, relative to the corpus).
REAL_WEIGHTS = {
    "4_real_caffemodels/ethereon_caffe-tensorflow_lenet/examples/mnist/lenet.prototxt":
        "4_real_caffemodels/ethereon_caffe-tensorflow_lenet/examples/mnist/lenet_iter_10000.caffemodel",
    "4_real_caffemodels/everpeace_caffe_2014/examples/mnist/lenet.prototxt":
        "4_real_caffemodels/everpeace_caffe_2014/examples/mnist/lenet_iter_10000.caffemodel",
    "4_real_caffemodels/everpeace_caffe_2014/examples/cifar10/cifar10_quick.prototxt":
        "4_real_caffemodels/everpeace_caffe_2014/examples/cifar10/cifar10_quick_iter_5000.caffemodel",
    "4_real_caffemodels/everpeace_caffe_2014/examples/cifar10/cifar10_full.prototxt":
        "4_real_caffemodels/everpeace_caffe_2014/examples/cifar10/cifar10_full_iter_70000.caffemodel",
    "4_real_caffemodels/jwcom79_cifar10_hdf5/examples/cifar10/cifar10_quick.prototxt":
        "4_real_caffemodels/jwcom79_cifar10_hdf5/examples/cifar10/cifar10_quick_iter_5000.caffemodel.h5",
    "4_real_caffemodels/jwcom79_cifar10_hdf5/examples/cifar10/cifar10_full.prototxt":
        "4_real_caffemodels/jwcom79_cifar10_hdf5/examples/cifar10/cifar10_full_iter_70000.caffemodel.h5",
    "4_real_caffemodels/ry0_cifar10_impact_scar/cifar10_quick.prototxt":
        "4_real_caffemodels/ry0_cifar10_impact_scar/caffemodel/normal/cifar10_impact_scar_quick_iter_10000.caffemodel",
    "4_real_caffemodels/ry0_cifar10_impact_scar/cifar10_quick_padded.prototxt":
        "4_real_caffemodels/ry0_cifar10_impact_scar/caffemodel/padded/"
        "cifar10_impact_scar_quick_padded_iter_10000.caffemodel",
    **{f"4_real_caffemodels/mtcnn_kpzhang93/code/codes/MTCNNv2/model/det{i}.prototxt":
       f"4_real_caffemodels/mtcnn_kpzhang93/code/codes/MTCNNv2/model/det{i}.caffemodel" for i in range(1, 5)},
    "4_real_caffemodels/vanillacnn_ishay2b/ZOO/vanilla_deploy.prototxt":
        "4_real_caffemodels/vanillacnn_ishay2b/ZOO/vanillaCNN.caffemodel",
}

BATCH = 2  # batch 1 where the declared height/width must stay (>= 160: global pooling of fixed size)
MIN_SIDE = 56  # large inputs are divided by 2, 4 or 8 down to about this height/width
# Nets with more parameters (VGG16 fast R-CNN fc6, FCN-8s fc6: 134M+) are built but compared with OpenCV
# only with CAFFEPORT_CORPUS_FULL=1: random weights, the weights file and OpenCV's copy cost seconds each.
MAX_PARAMS = float("inf") if os.environ.get("CAFFEPORT_CORPUS_FULL") else 70e6
# Above this, weights reach OpenCV through save_caffemodel(net.state_blobs()) instead of net.save (the
# same bytes per blob, ~6x faster: net.save round-trips every blob through protobuf messages).
NET_SAVE_MAX_PARAMS = 10e6

# Filled by the tests, printed by conftest.py's terminal summary and checked by test_summary.
REPORT: dict[str, list[str]] = {"built": [], "unsupported": [], "compared": [], "not_compared": []}


def _rel(path: Path) -> str:
    return str(path.relative_to(CORPUS))


def _missing_types(path: Path) -> list[str]:
    reg = registry()
    return sorted({lp.type for lp in read_quiet(path).layer if lp.type not in reg})


def _missing_python_modules(path: Path) -> list[str]:
    out = []
    for lp in read_quiet(path).layer:
        if lp.type == "Python" and python_equivalent(lp) is None:
            mod = lp.python_param.module
            try:
                found = importlib.util.find_spec(mod) is not None
            except (ImportError, ValueError):
                found = False
            if not found:
                out.append(mod)
    return out


def _small_net(path: Path, declared: dict[str, tuple[int, ...]], batch: int = BATCH):
    """(input shapes, Net) at batch BATCH, height/width divided by the largest of 8, 4, 2, 1 that keeps
    them >= MIN_SIDE and still gives a net with non-empty blobs (fc fan-ins shrink with the input, the
    architecture stays)."""
    side = min((min(s[2:]) for s in declared.values() if len(s) == 4), default=0)
    divs = [d for d in (8, 4, 2) if side // d >= MIN_SIDE] + [1]
    err = None
    for div in divs:
        shapes = {k: (batch, s[1], *(d // div for d in s[2:])) if len(s) == 4 else s for k, s in declared.items()}
        try:
            net = build(path, shapes)
        except (CaffeportError, RuntimeError, ValueError) as e:
            err = e
            continue
        if all(d > 0 for s in net._shapes.values() for d in s):
            if div == 1 and side >= 160:  # too costly at batch 2
                shapes = {k: (1, *s[1:]) if len(s) == 4 else s for k, s in shapes.items()}
                net = build(path, shapes)
            return shapes, net
    raise AssertionError(f"{_rel(path)} does not build at batch {batch}: {err}")


def _detection_rows(x: np.ndarray) -> np.ndarray:
    """DetectionOutput rows (image, label, score, xmin, ymin, xmax, ymax) in a canonical order (OpenCV
    orders them by score, Caffe by image, then label, then score)."""
    m = np.asarray(x, dtype=np.float64).reshape(-1, 7)
    m = m[m[:, 2] > 0]
    return m[np.lexsort(m.T[::-1])]


def _inputs(rel: str, shapes: dict[str, tuple[int, ...]], real: bool) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds = {}
    for name, s in shapes.items():
        if name == "rois":  # fast R-CNN: (batch index, x1, y1, x2, y2) inside the image
            hw = [v for k, v in shapes.items() if k != "rois" and len(v) == 4][0][2:]
            n = s[0]
            x1 = rng.uniform(0, hw[1] / 2, n)
            y1 = rng.uniform(0, hw[0] / 2, n)
            x2 = x1 + rng.uniform(8, hw[1] / 2, n)
            y2 = y1 + rng.uniform(8, hw[0] / 2, n)
            feeds[name] = np.stack([np.zeros(n), x1, y1, x2, y2], 1).astype(np.float32)
        elif real and "mnist" in rel:
            feeds[name] = rng.uniform(0, 1, s).astype(np.float32)  # pixels * 1/256
        elif real and "cifar10" in rel:
            feeds[name] = (rng.standard_normal(s) * 60).astype(np.float32)  # pixels - mean
        elif real and "mtcnn" in rel:
            feeds[name] = rng.uniform(-1, 1, s).astype(np.float32)  # (pixels - 127.5) / 128
        else:
            feeds[name] = rng.standard_normal(s).astype(np.float32)
    return feeds


def _blobs_to_compare(net) -> list[str]:
    """Net outputs, then the tops of Pooling layers (not rewritten in place afterwards)."""
    names = list(net.outputs)
    for p in net._plans:
        if p.layer.param.type == "Pooling":
            top = p.tops[0]
            rewritten = any(top in q.tops and top in q.bottoms for q in net._plans)
            if not rewritten and top not in names:
                names.append(top)
    return names


def _boost_detection_scores(net) -> None:
    """Random weights give near-uniform class scores, below DetectionOutput's confidence threshold:
    scale the confidence convolutions so that there are detections to compare."""
    if not any(p.layer.param.type == "DetectionOutput" for p in net._plans):
        return
    with torch.no_grad():
        for p in net._plans:
            if p.layer.param.type == "Convolution" and "conf" in p.layer.name:
                for b in p.layer.blobs:
                    b.mul_(30)


@pytest.mark.parametrize("path", DEPLOY, ids=[_rel(p) for p in DEPLOY])
def test_deploy_net(path: Path, tmp_path: Path) -> None:
    rel = _rel(path)
    declared = input_shapes(read_quiet(path))
    weights = REAL_WEIGHTS.get(rel)

    # 1. builds in TEST phase (at batch 2, large inputs at a smaller height/width), or fails naming exactly
    # the unsupported layer types / missing Python modules
    missing = _missing_types(path)
    missing_py = [m for m in _missing_python_modules(path) if not missing]
    if missing or missing_py:
        unexpected = [t for t in missing if t not in EXPECTED_UNSUPPORTED]
        assert not unexpected, f"{rel}: layer types {unexpected} are not registered and not in EXPECTED_UNSUPPORTED"
        unexpected = [m for m in missing_py if m not in EXPECTED_MISSING_PYTHON_MODULES]
        assert not unexpected, f"{rel}: Python modules {unexpected} not importable"
        with pytest.raises(CaffeportError) as err:
            build(path, {k: (1, *s[1:]) for k, s in declared.items()})
        for name in missing + missing_py:
            assert re.search(rf"\b{re.escape(name)}\b", str(err.value)), f"error does not name {name}: {err.value}"
        REPORT["unsupported"].append(f"{rel}: {', '.join(missing + missing_py)}")
        return
    cv2 = cv2_caffe()
    why_not = CV2_MISSING if cv2 is None else cv_cannot_load(cv2, path)
    if why_not:  # build only
        net = build(path, {k: (1, *s[1:]) for k, s in declared.items()})
    elif weights:
        shapes = {k: (BATCH, *s[1:]) for k, s in declared.items()}
        net = build(path, shapes, CORPUS / weights)
    else:
        shapes, net = _small_net(path, declared, batch=1 if rel in SINGLE_IMAGE_NETS else BATCH)
    for blob, shape in net._shapes.items():
        assert all(d > 0 for d in shape), f"{rel}: blob {blob} has shape {shape}"
    REPORT["built"].append(rel)
    if not why_not and n_params(net) > MAX_PARAMS:
        why_not = f"{n_params(net) / 1e6:.0f}M parameters (set CAFFEPORT_CORPUS_FULL=1 to compare it too)"
    if why_not:
        REPORT["not_compared"].append(f"{rel}: {why_not}")
        return

    # 2. forward == OpenCV's, on the same weights file
    if weights and not weights.endswith(".h5"):
        model = CORPUS / weights
    else:
        if not weights:
            random_weights(net, seed=len(rel))
            _boost_detection_scores(net)
        model = tmp_path / "weights.caffemodel"
        if n_params(net) <= NET_SAVE_MAX_PARAMS:
            net.save(model)
        else:
            save_caffemodel(net.state_blobs(), model)
    feeds = _inputs(rel, shapes, bool(weights))
    names = _blobs_to_compare(net)
    ours = net.forward(blobs=names, **feeds)
    layer_of = {}
    for b in names:
        prod = producer(net, b)
        if prod is not None and prod[1] == 0:
            layer_of[b] = prod[0]
    try:
        theirs = cv_forward(cv2, path, model, feeds, list(layer_of.values()))
    except cv2.error as e:
        msg = [line for line in str(e).strip().splitlines() if line.strip()]
        REPORT["not_compared"].append(f"{rel}: OpenCV: {msg[-1][:150] if msg else e}")
        return
    errs = {}
    for b, layer in layer_of.items():
        if net.layer_dict[layer].param.type == "DetectionOutput":
            mine, ref = _detection_rows(ours[b]), _detection_rows(theirs[layer])
            assert len(mine), f"{rel}: no detections to compare in '{b}'"
            # Caffe's order: image, then label ascending, then score descending
            key = [(r[0], r[1], -r[2]) for r in np.asarray(ours[b]).reshape(-1, 7)]
            assert key == sorted(key), f"{rel}: '{b}' rows are not in Caffe's (image, label, score) order"
            errs[b] = rel_err(mine, ref)
        else:
            errs[b] = rel_err(ours[b], theirs[layer])
    worst = max(errs, key=errs.get)
    assert errs[worst] <= TOL, f"{rel}: blob '{worst}' differs from OpenCV by {errs[worst]:.2e} (relative); " \
        f"all: { {b: f'{e:.1e}' for b, e in errs.items()} }"
    size = "x".join(map(str, next(iter(shapes.values()))))
    REPORT["compared"].append(f"{rel} [{size}, {'real' if weights else 'random'} weights, {len(errs)} blobs]: "
                              f"max rel err {errs[worst]:.1e} ({worst})")


def test_expected_unsupported_is_current() -> None:
    reg = registry()
    now_registered = [t for t in EXPECTED_UNSUPPORTED if t in reg]
    assert not now_registered, (f"{now_registered} are registered now: remove them from EXPECTED_UNSUPPORTED "
                                "so that their nets get built and compared with OpenCV")
    used = {t for p in DEPLOY for t in _missing_types(p)}
    stale = [t for t in EXPECTED_UNSUPPORTED if t not in used]
    assert not stale, f"{stale} are used by no corpus deploy net: remove them from EXPECTED_UNSUPPORTED"
    assert all(CORPUS / p in DEPLOY for p in SINGLE_IMAGE_NETS), "SINGLE_IMAGE_NETS names a net not in the corpus"
    for mod in EXPECTED_MISSING_PYTHON_MODULES:
        assert importlib.util.find_spec(mod.split(".")[0]) is None, f"{mod} is importable now: update the test"


def test_corpus_deploy_nets_found() -> None:
    assert len(DEPLOY) >= 60, [_rel(p) for p in DEPLOY]
    assert all((CORPUS / w).exists() for w in REAL_WEIGHTS.values())
    assert all((CORPUS / p) in DEPLOY for p in REAL_WEIGHTS)
    assert REAL.exists()


def test_summary() -> None:
    """Runs last (file order): most buildable nets must have been compared with OpenCV."""
    assert cv2_caffe() is not None, CV2_MISSING
    if not REPORT["built"]:
        return  # run alone (-k): the per-net tests did not run in this process, nothing to summarise
    print("\n".join(f"{k}: {v}" for k, lines in REPORT.items() for v in lines))
    assert len(REPORT["compared"]) >= 0.8 * len(REPORT["built"]), REPORT["not_compared"]

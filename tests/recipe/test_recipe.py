"""The cats-vs-dogs recipe end to end at toy size (seconds): create-lmdb, compute-image-mean, a stand-in
pretrained caffemodel, fine-tuning with frozen layers, plot/parse-log, predict, and the tutorial's own
pycaffe flow through ``caffeport.compat``.

The toy net is the tutorial's ``caffenet_train_val_2_frozen.prototxt`` (CaffeNet topology: 5 convs
with groups, LRN, 3 pools, fc6/fc7 with dropout, fc8-cats-dogs) with narrower layers and 67x67 images
(the smallest size for which pool5 is still 1x1). Expected values are computed independently (numpy,
OpenCV, the log text), never read back from the code under test.
"""

from __future__ import annotations

import csv
import glob
import io
import re
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.xdist_group("recipe")

SAMPLES = Path(__file__).resolve().parents[2] / "samples" / "cats_dogs"
CORPUS = Path("/work/shared/corpus/1_tutorial_cats_dogs")
SIZE = 67
WIDTHS = {"conv1": 8, "conv2": 16, "conv3": 16, "conv4": 16, "conv5": 16, "fc6": 32, "fc7": 32}
FROZEN = ("conv1", "conv2", "conv3", "conv4", "conv5")


def _toy_net(src: Path, dst: Path, fc8: str | None = None, fc8_outputs: int | None = None,
             train_batch: int = 8, test_batch: int = 4) -> Path:
    """``src`` with the narrow widths, 67x67 crops, small batches (and fc8 renamed/resized if asked)."""
    from google.protobuf import text_format

    from caffeport.io import read_net

    net = read_net(src)
    for lp in net.layer:
        if lp.name in WIDTHS:
            p = lp.convolution_param if lp.type == "Convolution" else lp.inner_product_param
            p.num_output = WIDTHS[lp.name]
        if lp.type == "Data":
            lp.transform_param.crop_size = SIZE
            lp.data_param.batch_size = train_batch if lp.include and lp.include[0].phase == 0 else test_batch
        if lp.type == "Input":
            lp.input_param.shape[0].dim[2] = SIZE
            lp.input_param.shape[0].dim[3] = SIZE
        if fc8 and lp.name.startswith("fc8"):
            old = lp.name
            lp.name = fc8
            lp.top[0] = fc8
            if fc8_outputs:
                lp.inner_product_param.num_output = fc8_outputs
            for other in net.layer:
                for i, b in enumerate(other.bottom):
                    if b == old:
                        other.bottom[i] = fc8
    dst.write_text(text_format.MessageToString(net))
    return dst


@pytest.fixture(scope="module")
def recipe(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny run of the recipe in the tutorial's layout: images, LMDBs, mean, stand-in weights."""
    import cv2

    from caffeport.demo import draw_pet
    from caffeport.tools.cats_dogs import create_lmdb
    from caffeport.tools.mean import compute_image_mean

    root = tmp_path_factory.mktemp("cats_dogs")
    train = root / "input" / "train"
    test1 = root / "input" / "test1"
    train.mkdir(parents=True)
    test1.mkdir(parents=True)
    for kind in ("cat", "dog"):
        for i in range(12):
            cv2.imwrite(str(train / f"{kind}.{i}.jpg"), draw_pet(kind, i, size=(90, 80)))
    for n in range(1, 6):
        cv2.imwrite(str(test1 / f"{n}.jpg"), draw_pet("cat" if n % 2 else "dog", 1000 + n, size=(90, 80)))
    res = create_lmdb(train, root / "input", img_width=SIZE, img_height=SIZE, seed=3, show_progress=False)
    mean = compute_image_mean(res.train_lmdb, root / "input" / "mean.binaryproto")
    net = _toy_net(SAMPLES / "caffenet_train_val_2_frozen.prototxt", root / "train_val.prototxt")
    deploy = _toy_net(SAMPLES / "caffenet_deploy_2.prototxt", root / "deploy.prototxt")
    return {"root": root, "train": train, "test1": test1, "lmdb": res, "mean": mean, "net": net, "deploy": deploy}


def _records(path: Path) -> list[tuple[bytes, object]]:
    import lmdb

    from caffeport.proto import caffe_pb2

    env = lmdb.open(str(path), readonly=True, lock=False)
    out = []
    with env.begin() as txn:
        for k, v in txn.cursor():
            d = caffe_pb2.Datum()
            d.ParseFromString(v)
            out.append((bytes(k), d))
    env.close()
    return out


# --- create-lmdb ---------------------------------------------------------------------------------


def test_create_lmdb_split_keys_and_datums(recipe: dict) -> None:
    import cv2

    res = recipe["lmdb"]
    order = res.order  # the shuffled file list; the split is by position in it
    assert sorted(p.name for p in order) == sorted(p.name for p in recipe["train"].iterdir())
    train, val = _records(res.train_lmdb), _records(res.validation_lmdb)
    assert (len(train), len(val)) == (20, 4) == (res.n_train, res.n_validation)
    assert [k for k, _ in val] == [f"{i:05d}".encode() for i in range(0, 24, 6)]
    assert [k for k, _ in train] == [f"{i:05d}".encode() for i in range(24) if i % 6]
    for key, d in train[:3] + val[:2]:
        idx = int(key)
        path = order[idx]
        assert (d.channels, d.height, d.width, d.encoded) == (3, SIZE, SIZE, False)
        assert d.label == (0 if path.name.startswith("cat") else 1)
        img = cv2.imread(str(path), cv2.IMREAD_COLOR)  # the tutorial's transform_img, by hand
        eq = np.dstack([cv2.equalizeHist(img[:, :, c].copy()) for c in range(3)])
        want = cv2.resize(eq, (SIZE, SIZE), interpolation=cv2.INTER_CUBIC)
        got = np.frombuffer(d.data, np.uint8).reshape(3, SIZE, SIZE)
        np.testing.assert_array_equal(got, want.transpose(2, 0, 1))  # BGR planes, C,H,W


def test_label_comes_from_the_base_name_not_the_folder(tmp_path: Path) -> None:
    from caffeport.errors import CaffeportError
    from caffeport.tools.cats_dogs import label_from_name

    assert label_from_name(tmp_path / "cats_dogs" / "dog.7.jpg") == 1
    assert label_from_name("/data/dogs/cat.1.jpg") == 0
    with pytest.raises(CaffeportError, match="cat.<n>.jpg"):
        label_from_name("/data/cats/12.jpg")


def test_create_lmdb_refuses_to_overwrite(recipe: dict) -> None:
    from caffeport.errors import CaffeportError
    from caffeport.tools.cats_dogs import create_lmdb

    with pytest.raises(CaffeportError, match="already exists"):
        create_lmdb(recipe["train"], recipe["root"] / "input", img_width=SIZE, img_height=SIZE)


def test_mean_image_matches_numpy(recipe: dict) -> None:
    from caffeport.proto import caffe_pb2

    arrays = [np.frombuffer(d.data, np.uint8).reshape(3, SIZE, SIZE) for _, d in _records(recipe["lmdb"].train_lmdb)]
    want = np.mean(np.stack(arrays).astype(np.float64), axis=0)
    bp = caffe_pb2.BlobProto()
    bp.ParseFromString((recipe["root"] / "input" / "mean.binaryproto").read_bytes())
    assert (bp.num, bp.channels, bp.height, bp.width) == (1, 3, SIZE, SIZE)
    got = np.asarray(bp.data, np.float32).reshape(3, SIZE, SIZE)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-3)


# --- stand-in weights and fine-tuning -----------------------------------------------------------


@pytest.fixture(scope="module")
def finetuned(recipe: dict) -> dict:
    """Stand-in 'pretrained' file (fc8 with 10 outputs, names as bvlc_reference_caffenet) and a
    fine-tuning run of the frozen toy net through the library behind ``caffeport train``."""
    import torch

    from caffeport.demo import train_with_solver
    from caffeport.io import load_caffemodel
    from caffeport.net import TRAIN, Net

    root = recipe["root"]
    torch.manual_seed(0)
    std = _toy_net(SAMPLES / "caffenet_train_val_1.prototxt", root / "standin.prototxt", fc8="fc8", fc8_outputs=10)
    pre = Net(std, phase=TRAIN)
    for name in FROZEN + ("fc6", "fc7"):  # non-trivial 'pretrained' blobs
        for b in pre.params[name]:
            b.data[...] = np.random.default_rng(len(name)).normal(0, 0.05, b.shape).astype(np.float32)
    pre.params["conv1"][0].data[...] *= 0.05
    weights = root / "standin.caffemodel"
    pre.save(weights)
    solver = root / "solver.prototxt"
    solver.write_text(f'net: "{recipe["net"]}"\ntest_iter: 1\ntest_interval: 10\nbase_lr: 0.001\n'
                      'lr_policy: "fixed"\ndisplay: 1\nmax_iter: 30\nmomentum: 0.9\nweight_decay: 0.0005\n'
                      f'snapshot: 0\nsnapshot_prefix: "{root / "toy"}"\nsolver_mode: CPU\nrandom_seed: 5\n')
    start: dict[str, np.ndarray] = {}

    def before(s: object) -> None:
        for name in ("fc8-cats-dogs", "fc6"):
            start[name] = s.net.params[name][0].data.copy()  # type: ignore[attr-defined]

    log = root / "toy_train.log"
    s = train_with_solver(solver, weights, log, echo=False, before=before)
    final = root / f"toy_iter_{s.iter}.caffemodel"  # type: ignore[attr-defined]
    return {"weights": weights, "pre": load_caffemodel(weights), "final": final, "log": log, "start": start,
            "trained": load_caffemodel(final)}


def test_frozen_layers_unchanged_byte_for_byte(finetuned: dict) -> None:
    pre, trained = finetuned["pre"], finetuned["trained"]
    for name in FROZEN:
        assert len(pre[name]) == len(trained[name]) == 2
        for a, b in zip(pre[name], trained[name]):
            assert a.tobytes() == b.tobytes(), name
    # fc6/fc7 were copied (start == pretrained) and then learned
    np.testing.assert_array_equal(finetuned["start"]["fc6"], pre["fc6"][0])
    assert not np.array_equal(trained["fc6"][0], pre["fc6"][0])


def test_fc8_cats_dogs_is_fresh(finetuned: dict) -> None:
    pre = finetuned["pre"]
    assert "fc8-cats-dogs" not in pre and pre["fc8"][0].shape == (10, 32)
    w0 = finetuned["start"]["fc8-cats-dogs"]
    assert w0.shape == (2, 32)
    # gaussian filler std 0.01 (the file's fc8 has other values and another shape)
    assert 0.004 < float(w0.std()) < 0.02
    assert finetuned["trained"]["fc8-cats-dogs"][1].shape == (2,)


def test_training_loss_decreases_and_log_parses(finetuned: dict) -> None:
    from caffeport.tools.logs import parse_log

    text = finetuned["log"].read_text()
    losses = [float(m) for m in re.findall(r"Train net output #0: loss = ([\d.e+-]+)", text)]
    assert len(losses) == 30
    assert np.mean(losses[-8:]) < np.mean(losses[:8])
    parsed = parse_log(finetuned["log"])
    assert parsed.column("train", "loss") == pytest.approx(losses, rel=1e-6)
    assert parsed.column("train", "NumIters") == list(map(float, range(30)))
    accs = [float(m) for m in re.findall(r"Test net output #\d+: accuracy = ([\d.e+-]+)", text)]
    assert parsed.column("test", "accuracy") == pytest.approx(accs)


# --- plot-log / parse-log -----------------------------------------------------------------------


def test_plot_log_writes_a_png(finetuned: dict, tmp_path: Path) -> None:
    import matplotlib.image

    from caffeport.tools.logs import plot_log

    out = plot_log(finetuned["log"], tmp_path / "curve.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    img = matplotlib.image.imread(str(out))
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert not list(tmp_path.glob(".*.tmp"))


CORPUS_LOGS = sorted(glob.glob(str(CORPUS / "third_party_runs" / "*" / "caffe_models" / "*" / "model_*_train.log")))


def test_corpus_has_caffe_logs() -> None:
    assert len(CORPUS_LOGS) >= 4, "the shared corpus's tutorial training logs are missing"


@pytest.mark.parametrize("log", CORPUS_LOGS, ids=lambda p: "/".join(Path(p).parts[-4:-1]))
def test_parse_log_on_real_caffe_logs(log: str, tmp_path: Path) -> None:
    from caffeport.tools.logs import write_parse_log_csv

    lines = Path(log).read_text().splitlines()
    # independent reading of the log text: test rows are 'Test net output' pairs after 'Testing net'
    solving = next(i for i, line in enumerate(lines) if "Solving" in line)
    tests: list[tuple[int, float, float]] = []
    trains: list[tuple[int, float]] = []
    it = -1
    acc = None
    for line in lines[solving + 1:]:
        m = re.search(r"Iteration (\d+)", line)
        if m:
            it = int(m.group(1))
        if "Test net output #0: accuracy = " in line:
            acc = float(line.rsplit("= ", 1)[1])
        elif "Test net output #1: loss = " in line:
            tests.append((it, acc, float(line.split("loss = ")[1].split()[0])))
        elif "Train net output #0: loss = " in line:
            trains.append((it, float(line.split("loss = ")[1].split()[0])))
    files = write_parse_log_csv(log, tmp_path)
    name = Path(log).name
    assert [f.name for f in files] == [name + ".train", name + ".test"]
    with open(tmp_path / (name + ".test"), newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["NumIters", "Seconds", "LearningRate", "accuracy", "loss"]
    assert [(int(float(r[0])), float(r[3]), float(r[4])) for r in rows[1:]] == tests
    with open(tmp_path / (name + ".train"), newline="") as f:
        trows = list(csv.reader(f))
    assert trows[0] == ["NumIters", "Seconds", "LearningRate", "loss"]
    assert [(int(float(r[0])), float(r[3])) for r in trows[1:]] == trains
    assert float(rows[1][2]) == 0.001  # the first row's lr is copied from the second
    secs = [float(r[1]) for r in trows[1:]]
    assert secs == sorted(secs) and secs[0] >= 0


def test_parse_log_rows_as_caffe_parse_log_py() -> None:
    from caffeport.tools.logs import parse_log_lines

    log = """I1231 23:59:50.000000  1 net.cpp:100] before solving: ignored
I1231 23:59:58.500000  1 solver.cpp:280] Solving CaffeNet
I1231 23:59:59.000000  1 solver.cpp:337] Iteration 0, Testing net (#0)
I1231 23:59:59.500000  1 solver.cpp:404]     Test net output #0: accuracy = 0.5
I1231 23:59:59.600000  1 solver.cpp:404]     Test net output #1: loss = 0.69 (* 1 = 0.69 loss)
I0101 00:00:01.000000  1 solver.cpp:228] Iteration 0, loss = 0.7
I0101 00:00:01.000000  1 solver.cpp:244]     Train net output #0: loss = 0.7 (* 1 = 0.7 loss)
I0101 00:00:01.000000  1 sgd_solver.cpp:106] Iteration 0, lr = 0.01
I0101 00:00:02.000000  1 solver.cpp:337] Iteration 10, Testing net (#0)
I0101 00:00:03.000000  1 solver.cpp:404]     Test net output #0: accuracy = 0.75
I0101 00:00:03.000000  1 solver.cpp:404]     Test net output #1: loss = 0.5 (* 1 = 0.5 loss)
I0101 00:00:04.000000  1 solver.cpp:244]     Train net output #0: loss = 0.6 (* 1 = 0.6 loss)
I0101 00:00:04.000000  1 sgd_solver.cpp:106] Iteration 10, lr = 0.001
"""
    p = parse_log_lines(io.StringIO(log))
    assert [list(r.items()) for r in p.test] == [
        [("NumIters", 0.0), ("Seconds", 1.0), ("LearningRate", 0.01), ("accuracy", 0.5), ("loss", 0.69)],
        [("NumIters", 10.0), ("Seconds", 4.5), ("LearningRate", 0.01), ("accuracy", 0.75), ("loss", 0.5)]]
    assert [list(r.values()) for r in p.train] == [[0.0, 2.5, 0.01, 0.7], [10.0, 5.5, 0.01, 0.6]]


# --- predict and the tutorial's pycaffe flow ---------------------------------------------------


def _numpy_probs(recipe: dict, weights: Path, files: list[Path]) -> np.ndarray:
    """The tutorial's preprocessing by hand, forward through caffeport.Net directly."""
    import cv2

    from caffeport.net import TEST, Net

    net = Net(recipe["deploy"], weights, TEST)
    out = []
    for f in files:
        img = cv2.imread(str(f), cv2.IMREAD_COLOR)
        img = np.dstack([cv2.equalizeHist(img[:, :, c].copy()) for c in range(3)])
        img = cv2.resize(img, (SIZE, SIZE), interpolation=cv2.INTER_CUBIC)
        x = img.astype(np.float32).transpose(2, 0, 1) - recipe["mean"]
        out.append(net.forward(data=x[None])["prob"][0].copy())
    return np.stack(out)


def test_predict_writes_kaggle_csv(recipe: dict, finetuned: dict, tmp_path: Path) -> None:
    from caffeport.tools.predict import predict_images, write_submission

    preds = predict_images(recipe["deploy"], finetuned["final"], [recipe["test1"]],
                           recipe["root"] / "input" / "mean.binaryproto", batch_size=2, show_progress=False)
    out = write_submission(preds, tmp_path / "submission.csv")
    rows = list(csv.reader(out.open()))
    assert rows[0] == ["id", "label"]
    assert [r[0] for r in rows[1:]] == ["1", "2", "3", "4", "5"]
    files = [recipe["test1"] / f"{i}.jpg" for i in range(1, 6)]
    want = _numpy_probs(recipe, finetuned["final"], files)
    np.testing.assert_allclose([float(r[1]) for r in rows[1:]], want[:, 1], atol=2e-6)
    np.testing.assert_allclose(want.sum(1), 1.0, atol=1e-5)


def test_tutorial_pycaffe_flow_through_compat(recipe: dict, finetuned: dict) -> None:
    import cv2

    import caffeport.compat as caffe
    from caffeport.proto import caffe_pb2 as our_pb2

    caffe_pb2 = caffe.proto.caffe_pb2
    files = [recipe["test1"] / f"{i}.jpg" for i in range(1, 6)]
    # make_predictions_2.py, with only the import changed (paths and Python 3 aside)
    mean_blob = caffe_pb2.BlobProto()
    with open(str(recipe["root"] / "input" / "mean.binaryproto"), "rb") as f:
        mean_blob.ParseFromString(f.read())
    mean_array = np.asarray(mean_blob.data, dtype=np.float32).reshape(
        (mean_blob.channels, mean_blob.height, mean_blob.width))
    net = caffe.Net(str(recipe["deploy"]), str(finetuned["final"]), caffe.TEST)
    transformer = caffe.io.Transformer({"data": net.blobs["data"].data.shape})
    transformer.set_mean("data", mean_array)
    transformer.set_transpose("data", (2, 0, 1))
    got = []
    for img_path in files:
        img = cv2.imread(str(img_path), cv2.IMREAD_COLOR)
        img[:, :, 0] = cv2.equalizeHist(img[:, :, 0])
        img[:, :, 1] = cv2.equalizeHist(img[:, :, 1])
        img[:, :, 2] = cv2.equalizeHist(img[:, :, 2])
        img = cv2.resize(img, (SIZE, SIZE), interpolation=cv2.INTER_CUBIC)
        net.blobs["data"].data[...] = transformer.preprocess("data", img)
        out = net.forward()
        got.append(np.array(out["prob"][0]))
    assert caffe_pb2 is our_pb2 or hasattr(caffe_pb2, "BlobProto")
    want = _numpy_probs(recipe, finetuned["final"], files)
    np.testing.assert_allclose(np.stack(got), want, atol=1e-6)


# --- CLI -----------------------------------------------------------------------------------------


def test_cli_recipe_commands(recipe: dict, finetuned: dict, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from caffeport.cli import main

    r = CliRunner()
    res = r.invoke(main, ["create-lmdb", str(recipe["train"]), str(tmp_path / "db"), "--width", "32",
                          "--height", "32", "--test-dir", str(recipe["test1"])])
    assert res.exit_code == 0, res.output
    assert "train_lmdb: 20 records" in res.output and "validation_lmdb: 4 records" in res.output
    assert len(_records(tmp_path / "db" / "test_lmdb")) == 5
    res = r.invoke(main, ["parse-log", str(finetuned["log"]), str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "toy_train.log.train").read_text().startswith("NumIters,Seconds,LearningRate,loss")
    res = r.invoke(main, ["plot-log", str(finetuned["log"]), str(tmp_path / "c.png")])
    assert res.exit_code == 0 and (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    res = r.invoke(main, ["predict", str(recipe["test1"]), "--model", str(recipe["deploy"]), "--weights",
                          str(finetuned["final"]), "--mean", str(recipe["root"] / "input" / "mean.binaryproto"),
                          "--out", str(tmp_path / "s.csv"), "--argmax"])
    assert res.exit_code == 0, res.output
    rows = (tmp_path / "s.csv").read_text().splitlines()
    assert rows[0] == "id,label" and len(rows) == 6 and all(r.split(",")[1] in ("0", "1") for r in rows[1:])


# --- the bundled samples ------------------------------------------------------------------------


def test_samples_are_the_tutorial_files_with_relative_paths() -> None:
    from caffeport.io import read_net, read_solver

    for n in (1, 2):
        ours = (SAMPLES / f"caffenet_train_val_{n}.prototxt").read_text()
        body = "\n".join(ours.splitlines()[2:])  # without our two-line header
        theirs = (CORPUS / "caffe_models" / f"caffe_model_{n}" / f"caffenet_train_val_{n}.prototxt")
        if theirs.exists():
            assert body.strip() == theirs.read_text().replace("/home/ubuntu/cats-dogs-tutorial/", "").strip()
        assert "/home/" not in body
    base = read_net(SAMPLES / "caffenet_train_val_2.prototxt")
    assert [lp.inner_product_param.num_output for lp in base.layer if lp.name == "fc8-cats-dogs"] == [2]
    for variant in ("caffenet_train_val_2_frozen.prototxt", "caffenet_train_val_demo.prototxt"):
        v = read_net(SAMPLES / variant)
        assert [lp.name for lp in v.layer] == [lp.name for lp in base.layer]
        for a, b in zip(base.layer, v.layer):
            lrs = [p.lr_mult for p in b.param]
            if a.name in FROZEN:
                assert lrs == [0, 0]
            else:
                assert lrs == [p.lr_mult for p in a.param]
    solver = read_solver(SAMPLES / "solver_demo.prototxt", resolve_paths=False)
    assert solver.net == "caffenet_train_val_demo.prototxt" and solver.max_iter <= 200

"""Seeded mutation fuzzer over every file kind caffeport reads, with a resource guard.

``python -m tests.fuzz.fuzz_runner --seconds 40 --seed 0`` runs a worker subprocess (RLIMIT_AS
``--memory-gib``, one SIGALRM per input) over inputs 0, 1, 2... each derived from (seed, index) alone:
target = index mod the number of targets, mutations from ``random.Random(seed, index)``. Every input is
classified:

- clean: no error, or a CaffeportError whose message names one of the case's files;
- unnamed: a CaffeportError that names none of them;
- crash: any other exception (or the worker died of a signal other than SIGKILL);
- hang: the per-input alarm fired;
- memory: MemoryError (or the worker was SIGKILLed: the OOM killer).

A worker that dies is restarted at the next index, so one bad input costs one input. The summary line
is ``tried N clean N crash N hang N memory N unnamed N`` and ``--json`` writes the failures (target,
index, kind, message, the input's bytes in hex) so each can become a regression test.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

KINDS = ("clean", "crash", "hang", "memory", "unnamed")
INTERESTING = ["-1", "0", "1", "-2147483648", "2147483647", "2147483648", "4294967296", "9223372036854775807",
               "9223372036854775808", "18446744073709551616", "2000000000", "65536", "1e30", "-1e30", "nan",
               "inf", "3.5", "999999999999999999999999"]

NET = """name: "fz"
layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ dim: 2 dim: 3 dim: 8 dim: 8 }} }} }}
layer {{ name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param {{ num_output: 4 kernel_size: 3 pad: 1 stride: 1 weight_filler {{ type: "xavier" }} }} }}
layer {{ name: "relu" type: "ReLU" bottom: "conv" top: "conv" }}
layer {{ name: "pool" type: "Pooling" bottom: "conv" top: "pool"
  pooling_param {{ pool: MAX kernel_size: 2 stride: 2 }} }}
layer {{ name: "lrn" type: "LRN" bottom: "pool" top: "lrn" lrn_param {{ local_size: 3 }} }}
layer {{ name: "ip" type: "InnerProduct" bottom: "lrn" top: "ip" inner_product_param {{ num_output: 3 }} }}
layer {{ name: "prob" type: "Softmax" bottom: "ip" top: "prob" }}
{extra}"""

TRAIN_NET = """name: "fzdata"
layer {{ name: "data" type: "{dtype}" top: "data" top: "label" include {{ phase: TEST }} {param} }}
layer {{ name: "ip" type: "InnerProduct" bottom: "data" top: "ip" inner_product_param {{ num_output: 3 }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }}
layer {{ name: "acc" type: "Accuracy" bottom: "ip" bottom: "label" top: "acc" }}
"""

SOLVER = """net: "net.prototxt"
base_lr: 0.01
momentum: 0.9
weight_decay: 0.0005
lr_policy: "step"
gamma: 0.1
stepsize: 100
max_iter: 10
display: 0
snapshot_prefix: "snap"
solver_mode: CPU
type: "SGD"
"""


# --------------------------------------------------------------------------------------------------
# mutations
# --------------------------------------------------------------------------------------------------
def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    for _ in range(rng.choice((1, 1, 2, 3, 5))):
        op = rng.randrange(7)
        n = len(b)
        if n == 0:
            b += bytes(rng.randrange(256) for _ in range(rng.randrange(1, 16)))
            continue
        i = rng.randrange(n)
        if op == 0:
            b[i] ^= 1 << rng.randrange(8)
        elif op == 1:
            b[i] = rng.choice((0, 0xFF, 0x7F, 0x80, 0x01))
        elif op == 2:
            del b[rng.randrange(n):]
        elif op == 3:
            b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 12)))
        elif op == 4:
            del b[i:i + rng.randrange(1, 32)]
        elif op == 5:
            j = rng.randrange(n)
            b[i:i] = b[j:j + rng.randrange(1, 64)]
        else:  # a huge varint
            b[i:i] = b"\xff" * rng.randrange(1, 10) + b"\x01"
    return bytes(b)


def mutate_text(text: str, rng: random.Random) -> str:
    for _ in range(rng.choice((1, 1, 2, 3))):
        op = rng.randrange(6)
        nums = list(re.finditer(r"-?\d+(\.\d+)?(e-?\d+)?", text))
        lines = text.split("\n")
        if op <= 1 and nums:
            m = rng.choice(nums)
            text = text[: m.start()] + rng.choice(INTERESTING) + text[m.end():]
        elif op == 2 and len(lines) > 1:
            del lines[rng.randrange(len(lines))]
            text = "\n".join(lines)
        elif op == 3 and len(lines) > 1:
            i, j = rng.randrange(len(lines)), rng.randrange(len(lines))
            lines[i], lines[j] = lines[j], lines[i]
            text = "\n".join(lines)
        elif op == 4:
            toks = list(re.finditer(r"[A-Za-z_]+", text))
            if toks:
                m = rng.choice(toks)
                text = text[: m.start()] + rng.choice([t.group() for t in toks]) + text[m.end():]
        else:
            text = mutate_bytes(text.encode(), rng).decode("utf-8", errors="replace")
    return text


# --------------------------------------------------------------------------------------------------
# targets: build the seed files once, then run(mutated bytes) -> None (or raise)
# --------------------------------------------------------------------------------------------------
class Targets:
    def __init__(self, work: Path):
        import numpy as np

        import caffeport
        from caffeport.io import save_caffemodel, write_blobproto, write_solverstate
        from caffeport.io.hdf5 import write_caffemodel_h5, write_solverstate_h5
        from caffeport.io.solverstate import SolverStateData
        from caffeport.proto import caffe_pb2

        self.np = np
        self.caffeport = caffeport
        self.work = work
        work.mkdir(parents=True, exist_ok=True)
        (work / "net.prototxt").write_text(NET.format(extra=""))
        net = caffeport.Net(work / "net.prototxt")
        self.weights = {n: [p.data.copy() for p in ps] for n, ps in net.params.items()}
        save_caffemodel(self.weights, work / "w.caffemodel")
        write_caffemodel_h5(self.weights, work / "w.caffemodel.h5")
        v1 = caffe_pb2.NetParameter(name="fz")
        for name, arrs in self.weights.items():
            lp = v1.layers.add(name=name, type=caffe_pb2.V1LayerParameter.INNER_PRODUCT)
            for a in arrs:
                b = lp.blobs.add(num=1, channels=1, height=1 if a.ndim == 1 else a.shape[0],
                                 width=a.shape[-1] if a.ndim <= 2 else int(np.prod(a.shape[1:])))
                b.data.extend(a.ravel().tolist())
        (work / "v1.caffemodel").write_bytes(v1.SerializeToString())
        write_blobproto(np.arange(60, dtype=np.float32).reshape(3, 4, 5), work / "mean.binaryproto")
        hist = [a * 0.5 for arrs in self.weights.values() for a in arrs]
        write_solverstate(SolverStateData(7, 1, "w.caffemodel", hist), work / "s.solverstate")
        write_solverstate_h5(work / "s.solverstate.h5", 7, 1, "w.caffemodel.h5", hist)
        (work / "solver.prototxt").write_text(SOLVER)
        # data sources
        import cv2

        from caffeport.io.lmdb_store import array_to_datum

        for i in range(3):
            cv2.imwrite(str(work / f"img{i}.png"), np.full((6, 5, 3), 40 * i, np.uint8))
        (work / "images.txt").write_text("img0.png 0\nimg1.png 1\nimg2.png 2\n")
        import h5py

        with h5py.File(work / "d.h5", "w") as f:
            f.create_dataset("data", data=np.arange(24, dtype=np.float32).reshape(4, 6))
            f.create_dataset("label", data=np.array([0, 1, 2, 1], np.float32))
        (work / "h5list.txt").write_text("d.h5\n")
        rng = np.random.default_rng(0)
        self.datum = array_to_datum(rng.integers(0, 255, (3, 4, 4)).astype(np.uint8), label=1).SerializeToString()
        self.targets: dict[str, tuple[str, bytes, Callable[[Path], None], list[str]]] = {}

        def add(name: str, fname: str, run: Callable[[Path], None], names: list[str]) -> None:
            self.targets[name] = (fname, (work / fname).read_bytes(), run, [fname, *names])

        add("net_prototxt", "net.prototxt", self._run_net, [])
        add("solver_prototxt", "solver.prototxt", self._run_solver, ["net.prototxt"])
        add("caffemodel_v2", "w.caffemodel", self._run_weights, ["net.prototxt"])
        add("caffemodel_v1", "v1.caffemodel", self._run_weights, ["net.prototxt"])
        add("caffemodel_h5", "w.caffemodel.h5", self._run_weights, ["net.prototxt"])
        add("binaryproto", "mean.binaryproto", self._run_blobproto, [])
        add("solverstate", "s.solverstate", self._run_solverstate, [])
        add("solverstate_h5", "s.solverstate.h5", self._run_solverstate, [])
        add("image_list", "images.txt", self._run_image_list, ["imgnet.prototxt", "img"])
        add("hdf5_list", "h5list.txt", self._run_h5_list, ["h5net.prototxt", "d.h5"])
        add("hdf5_data", "d.h5", self._run_h5_data, ["h5net.prototxt", "h5list.txt"])
        (work / "datum.bin").write_bytes(self.datum)
        add("lmdb_datum", "datum.bin", self._run_datum, ["lmdbnet.prototxt", "db_lmdb"])
        self.names = sorted(self.targets)

    # each run_* gets the path of the mutated file (already written)
    def _run_net(self, p: Path) -> None:
        net = self.caffeport.Net(p)
        net.forward()

    def _run_solver(self, p: Path) -> None:
        from caffeport.io import read_solver
        from caffeport.solver import get_solver

        read_solver(p)
        get_solver(p)

    def _run_weights(self, p: Path) -> None:
        from caffeport.io import load_caffemodel

        load_caffemodel(p)
        net = self.caffeport.Net(self.work / "net.prototxt")
        net.copy_from(p)
        net.forward()

    def _run_blobproto(self, p: Path) -> None:
        from caffeport.io import read_blobproto

        read_blobproto(p)

    def _run_solverstate(self, p: Path) -> None:
        from caffeport.io import read_solverstate

        read_solverstate(p)

    def _data_net(self, fname: str, dtype: str, param: str) -> None:
        p = self.work / fname
        p.write_text(TRAIN_NET.format(dtype=dtype, param=param))
        net = self.caffeport.Net(p)
        net.forward()
        net.forward()
        for layer in net.layers:  # stop prefetch threads now
            pf = getattr(layer, "prefetcher", None)
            if pf is not None:
                pf.close()

    def _run_image_list(self, p: Path) -> None:
        self._data_net("imgnet.prototxt", "ImageData",
                       f'image_data_param {{ source: "{p.name}" batch_size: 2 new_height: 4 new_width: 4 }}')

    def _run_h5_list(self, p: Path) -> None:
        self._data_net("h5net.prototxt", "HDF5Data", f'hdf5_data_param {{ source: "{p.name}" batch_size: 3 }}')

    def _run_h5_data(self, p: Path) -> None:
        (self.work / "h5list.txt").write_text(f"{p.name}\n")
        self._run_h5_list(self.work / "h5list.txt")

    def _run_datum(self, p: Path) -> None:
        from caffeport.io.lmdb_store import LMDBWriter

        db = self.work / "db_lmdb"
        shutil.rmtree(db, ignore_errors=True)
        with LMDBWriter(db) as w:
            w.put(b"0", self.datum)
            w.put(b"1", p.read_bytes())
            w.put(b"2", self.datum)
        self._data_net("lmdbnet.prototxt", "Data", f'data_param {{ source: "{db.name}" batch_size: 3 backend: LMDB }}')


def _case(targets: Targets, seed: int, index: int) -> tuple[str, str, bytes]:
    name = targets.names[index % len(targets.names)]
    fname, seed_bytes, _, _ = targets.targets[name]
    rng = random.Random(f"{seed}:{index}")
    if fname.endswith((".prototxt", ".txt")) and rng.random() < 0.7:
        data = mutate_text(seed_bytes.decode(), rng).encode()
    elif name == "lmdb_datum" and rng.random() < 0.5:
        from caffeport.proto import caffe_pb2

        d = caffe_pb2.Datum.FromString(targets.datum)
        field = rng.choice(["label", "channels", "height", "width"])
        val = int(float(rng.choice(["-1", "7", "3", "0", "2147483647", "-2147483648", "65536"])))
        setattr(d, field, val)
        data = d.SerializeToString()
    else:
        data = mutate_bytes(seed_bytes, rng)
    return name, fname, data


# --------------------------------------------------------------------------------------------------
# worker
# --------------------------------------------------------------------------------------------------
def _emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def worker(seed: int, start: int, deadline: float, limit: int, work: Path, memory_gib: float, alarm_s: int) -> None:
    import resource
    import signal

    resource.setrlimit(resource.RLIMIT_AS, (int(memory_gib * (1 << 30)),) * 2)
    import warnings

    warnings.simplefilter("ignore")
    import logging

    logging.disable(logging.CRITICAL)
    from caffeport.errors import CaffeportError

    targets = Targets(work)

    class Hang(BaseException):
        pass

    def on_alarm(*_: object) -> None:
        raise Hang()

    signal.signal(signal.SIGALRM, on_alarm)
    i = start
    while i < limit and time.time() < deadline:
        name, fname, data = _case(targets, seed, i)
        path = work / fname
        _emit({"start": i})
        kind, msg = "clean", ""
        try:
            path.write_bytes(data)
            signal.alarm(alarm_s)
            try:
                targets.targets[name][2](path)
            finally:
                signal.alarm(0)
        except Hang:
            kind, msg = "hang", f"no result after {alarm_s} s"
        except MemoryError:
            kind, msg = "memory", "MemoryError"
        except CaffeportError as e:
            msg = str(e)
            if not any(n in msg for n in targets.targets[name][3]):
                kind = "unnamed"
        except Exception as e:  # noqa: BLE001 - this is what the fuzzer looks for
            kind = "crash"
            tb = traceback.extract_tb(e.__traceback__)
            where = f" at {tb[-1].filename}:{tb[-1].lineno}" if tb else ""
            msg = f"{type(e).__name__}: {e}"[:400] + where
        finally:
            path.write_bytes(targets.targets[name][1])  # the seed file back for the other targets
        _emit({"i": i, "target": name, "kind": kind, "msg": msg[:500],
               "data": data.hex() if kind != "clean" and len(data) < 20000 else ""})
        i += 1
    _emit({"done": i})


# --------------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------------
def run(seconds: float, seed: int = 0, max_inputs: int = 10**9, memory_gib: float = 4.0, alarm_s: int = 10,
        workdir: Path | None = None) -> dict:
    """Fuzz for about ``seconds``; returns {counts per kind, tried, failures: [...]}."""
    root = Path(__file__).resolve().parents[2]
    tmp = Path(tempfile.mkdtemp(prefix="caffeport-fuzz-", dir=workdir))
    counts = dict.fromkeys(KINDS, 0)
    failures: list[dict] = []
    deadline = time.time() + seconds
    i = 0
    restarts = 0
    try:
        while i < max_inputs and time.time() < deadline:
            work = tmp / f"w{restarts}"
            cmd = [sys.executable, "-m", "tests.fuzz.fuzz_runner", "--worker", "--seed", str(seed), "--start", str(i),
                   "--deadline", str(deadline), "--max-inputs", str(max_inputs), "--work", str(work),
                   "--memory-gib", str(memory_gib), "--alarm", str(alarm_s)]
            errf = open(tmp / f"stderr{restarts}.txt", "w+")  # a file, not a pipe: a chatty worker cannot block
            proc = subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE, stderr=errf, text=True,
                                    env={**os.environ, "CAFFEPORT_FUZZ_WORKER": "1",
                                         # one blob may hold 2^26 floats (256 MiB): the element limit, not
                                         # the RLIMIT_AS guard, must stop absurd sizes
                                         "CAFFEPORT_MAX_BLOB_ELEMENTS": str(1 << 26)})
            current = None
            done = False
            assert proc.stdout is not None
            for line in proc.stdout:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if "start" in rec:
                    current = rec["start"]
                elif "done" in rec:
                    done = True
                    i = rec["done"]
                else:
                    counts[rec["kind"]] += 1
                    if rec["kind"] != "clean":
                        failures.append(rec)
                    current = None
                    i = rec["i"] + 1
            proc.wait()
            errf.seek(0)
            err = errf.read()
            errf.close()
            if done:
                break
            if current is None:  # died before its first input (set-up failed)
                raise RuntimeError(f"fuzz worker failed to start (rc {proc.returncode}): {err[-2000:]}")
            kind = "memory" if proc.returncode in (-9, 137) else "crash"
            counts[kind] += 1
            failures.append({"i": current, "target": "?", "kind": kind,
                             "msg": f"worker died (rc {proc.returncode}): {err[-300:]}", "data": ""})
            i = current + 1
            restarts += 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"tried": sum(counts.values()), **counts, "failures": failures}


def summary_line(res: dict) -> str:
    return "tried {tried} clean {clean} crash {crash} hang {hang} memory {memory} unnamed {unnamed}".format(**res)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-inputs", type=int, default=10**9)
    ap.add_argument("--memory-gib", type=float, default=4.0)
    ap.add_argument("--alarm", type=int, default=10)
    ap.add_argument("--json", type=Path, help="write the failures here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        worker(a.seed, a.start, a.deadline, a.max_inputs, a.work, a.memory_gib, a.alarm)
        return 0
    res = run(a.seconds, a.seed, a.max_inputs, a.memory_gib, a.alarm)
    print(summary_line(res))
    for f in res["failures"][:50]:
        print(f"  {f['kind']:8} {f['target']:16} #{f['i']}: {f['msg'][:300]}")
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))
    return 0 if all(res[k] == 0 for k in KINDS[1:]) else 1


if __name__ == "__main__":
    sys.exit(main())

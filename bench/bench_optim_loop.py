"""The plain PyTorch loop over ``caffeport.from_solver`` vs ``caffeport train``'s Solver.step.

Both train ``bvlc_reference_caffenet`` (batch 32, Input-fed synthetic batch, SGD momentum 0.9,
weight decay 5e-4, lr_mult 1/2 and decay_mult 1/0) in the same process: the Solver through
``Solver.step(1)``, the loop as ``zero_grad; model.loss(model(data=x, label=y)).backward();
optimizer.step(); scheduler.step()``. The two share the update code, so the ratio measures the
loop's own overhead. Interleaved round by round after one warm-up iteration each; prints
iterations/s and the ratio (plain loop / Solver; 1.0 = the same speed). No asserts.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from google.protobuf import text_format

from bench.bench_training import caffenet_prototxt
from caffeport import from_solver
from caffeport.proto import caffe_pb2
from caffeport.solver import get_solver


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args(argv or [])
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.batch, 3, 227, 227)).astype(np.float32)
    y = rng.integers(0, 1000, size=args.batch).astype(np.float32)

    param = caffe_pb2.SolverParameter(base_lr=0.01, momentum=0.9, weight_decay=5e-4, lr_policy="fixed",
                                      max_iter=10**6, display=0, snapshot=0, snapshot_after_train=False)
    text_format.Parse(caffenet_prototxt(args.batch), param.net_param)
    solver = get_solver(param)
    solver.net.blobs["data"].data[...] = x
    solver.net.blobs["label"].data[...] = y
    model, optimizer, scheduler = from_solver(param)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)

    def loop_step() -> None:
        optimizer.zero_grad()
        model.loss(model(data=xt, label=yt)).backward()
        optimizer.step()
        scheduler.step()

    solver.step(1)
    loop_step()
    t_solver = t_loop = 0.0
    for _ in range(args.iterations):
        t = time.perf_counter()
        solver.step(1)
        t_solver += time.perf_counter() - t
        t = time.perf_counter()
        loop_step()
        t_loop += time.perf_counter() - t
    ours, ref = args.iterations / t_loop, args.iterations / t_solver
    print(f"CaffeNet training, batch {args.batch}, {args.iterations} iterations, {torch.get_num_threads()} threads")
    print(f"  plain loop over from_solver:   {ours:.3f} iter/s")
    print(f"  caffeport train Solver.step:   {ref:.3f} iter/s")
    print(f"  ratio plain loop / Solver:     {ours / ref:.2f}")


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])

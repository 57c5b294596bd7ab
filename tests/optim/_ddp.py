"""What the DDP test's spawned workers import (kept light: no CLI, no pytest): a tiny HDF5-fed
net and solver, and the plain loop of ``caffeport.from_solver``, optionally under DDP."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

ITERS = 6
N_RECORDS = 12

NET = """
name: "ddp"
layer {{ name: "data" type: "HDF5Data" top: "data" top: "label"
  hdf5_data_param {{ source: "{root}/train.txt" batch_size: {batch} }} }}
layer {{ name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1"
  inner_product_param {{ num_output: 5 weight_filler {{ type: "gaussian" std: 0.5 }}
                         bias_filler {{ type: "constant" value: 0.1 }} }} }}
layer {{ name: "relu" type: "ReLU" bottom: "ip1" top: "ip1" }}
layer {{ name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
  param {{ lr_mult: 1 decay_mult: 1 }} param {{ lr_mult: 2 decay_mult: 0 }}
  inner_product_param {{ num_output: 3 weight_filler {{ type: "gaussian" std: 0.5 }} }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }}
"""

SOLVER = """net: "{net}"
type: "Nesterov"
base_lr: 0.2
momentum: 0.9
weight_decay: 0.001
lr_policy: "step"
gamma: 0.5
stepsize: 4
clip_gradients: 2.0
max_iter: 6
random_seed: 17
"""


def write_case(root: Path, name: str, batch: int) -> Path:
    """Records in ``root/train.h5`` (written once) and a solver+net reading ``batch`` per process."""
    if not (root / "train.h5").exists():
        import h5py

        rng = np.random.default_rng(3)
        with h5py.File(root / "train.h5", "w") as f:
            f["data"] = rng.normal(size=(N_RECORDS, 4)).astype(np.float32)
            f["label"] = rng.integers(0, 3, size=N_RECORDS).astype(np.float32)
        (root / "train.txt").write_text(str(root / "train.h5") + "\n")
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "net.prototxt").write_text(NET.format(root=root, batch=batch))
    (d / "solver.prototxt").write_text(SOLVER.format(net=d / "net.prototxt"))
    return d / "solver.prototxt"


def plain_loop(solver: Path, ddp: bool) -> dict[str, np.ndarray]:
    from caffeport import from_solver

    model, optimizer, scheduler = from_solver(solver)
    run = torch.nn.parallel.DistributedDataParallel(model) if ddp else model
    for _ in range(ITERS):
        optimizer.zero_grad()
        model.loss(run()).backward()
        optimizer.step()
        scheduler.step()
    return {f"{k}/{i}": t.detach().numpy().copy() for k, ts in model.params.items() for i, t in enumerate(ts)}


def worker(rank: int, world: int, port: int, solver: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        np.savez(f"{out}_{rank}.npz", **plain_loop(Path(solver), ddp=True))
    finally:
        dist.destroy_process_group()

"""The plain loop of ``caffeport.from_solver`` under ``torch.nn.parallel.DistributedDataParallel``
(gloo, two CPU processes) equals one process at double batch: Caffe's own data-parallel
equivalence (records dealt out r, r+W, ... per rank, gradients averaged, one shared update;
Nesterov with a step policy and gradient clipping, whose global norm is taken after averaging)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch.multiprocessing as mp

from caffeport.solver.parallel import _free_port
from tests.optim._ddp import plain_loop, worker, write_case


def test_ddp_two_processes_equal_one_with_double_batch(tmp_path: Path) -> None:
    two, one = write_case(tmp_path, "two", batch=2), write_case(tmp_path, "one", batch=4)
    out = tmp_path / "weights"
    mp.spawn(worker, args=(2, _free_port(), str(two), str(out)), nprocs=2, join=True)
    ranks = [dict(np.load(f"{out}_{r}.npz")) for r in range(2)]
    single = plain_loop(one, ddp=False)
    assert single.keys() == ranks[0].keys() == ranks[1].keys() == {"ip1/0", "ip1/1", "ip2/0", "ip2/1"}
    for k, v in single.items():
        np.testing.assert_array_equal(ranks[0][k], ranks[1][k], err_msg=k)  # the replicas stay identical
        np.testing.assert_allclose(ranks[0][k], v, rtol=1e-5, atol=1e-6, err_msg=k)
    from caffeport import from_solver

    start, _, _ = from_solver(one)  # the weights really moved
    assert not np.allclose(start.params["ip1"][0].detach().numpy(), single["ip1/0"])

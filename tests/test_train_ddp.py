"""Distributed training on CPU: the gradient-keeping all-gather, and a 2-process gloo run through torchrun."""
import os
import socket
import subprocess
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rcps_train.distributed import all_gather_with_grad
from test_train_data import tiny_dataset, tiny_overrides


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gather_worker(rank, world_size, port, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    x = torch.full((2, 3), float(rank + 1), requires_grad=True)
    gathered = all_gather_with_grad(x)
    # Rank r weighs everything by (r + 1); rank r's x feeds every rank's loss, so its gradient is sum_s (s + 1).
    ((rank + 1) * gathered).sum().backward()
    torch.save({"gathered": gathered.detach(), "grad": x.grad}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_all_gather_keeps_gradients_across_ranks(tmp_path):
    mp.spawn(_gather_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2)
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(result["gathered"], torch.tensor([[1.0] * 3] * 2 + [[2.0] * 3] * 2))
        torch.testing.assert_close(result["grad"], torch.full((2, 3), 3.0))


def test_torchrun_two_process_gloo_smoke(tmp_path):
    data = tiny_dataset(tmp_path / "data", num_train=6)  # 1 labeled, 1 validation, 4 unlabeled
    overrides = tiny_overrides(data, tmp_path, **{"run.name": '"ddp"', "loss.cross_rank_negatives": "true",
                                                   "train.epochs": 1, "eval.every_epochs": 0})
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(_free_port()), "-m", "rcps_train", "train", "--config", "demo"]
    for item in overrides:
        command += ["--set", item]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dir = tmp_path / "ddp"
    state = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert state["global_step"] == 2 and len(state["rng"]) == 2  # 4 unlabeled cases / 2 ranks, per-rank RNG
    assert (run_dir / "metrics.json").exists()
    rows = (run_dir / "train_log.csv").read_text().splitlines()
    assert len(rows) == 3 and "nan" not in rows[1]

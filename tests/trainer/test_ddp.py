"""Distributed training on CPU: the gradient-keeping all-gather, and a 2-process gloo run through torchrun."""

import os
import socket
import subprocess
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rcps_train import engine
from rcps_train.config import load_config
from rcps_train.distributed import all_gather_with_grad
from tests.trainer.tiny_data import tiny_dataset, tiny_overrides


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
    overrides = tiny_overrides(
        data,
        tmp_path,
        **{"run.name": '"ddp"', "loss.cross_rank_negatives": "true", "train.epochs": 1, "eval.every_epochs": 0},
    )
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),
        "-m",
        "rcps_train",
        "train",
        "--config",
        "demo",
    ]
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


def _failing_step(*args, **kwargs):
    raise RuntimeError("step failed on purpose")


def _process_group_worker(rank, world_size, ports, overrides, out_dir):
    torch.set_num_threads(1)
    os.environ.update(
        {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1"}
    )
    seen = {}
    # A group the caller set up: train() joins it and leaves it to the caller.
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{ports[0]}", rank=rank, world_size=world_size)
    engine.train(load_config(None, overrides + ['run.name="caller"']))
    seen["caller_group_kept"] = dist.is_initialized()
    dist.destroy_process_group()
    # A group train() set up from the torchrun variables: ended with the run...
    os.environ["MASTER_PORT"] = str(ports[1])
    engine.train(load_config(None, overrides + ['run.name="own"']))
    seen["own_group_ended"] = not dist.is_initialized()
    # ... and when the run fails.
    os.environ["MASTER_PORT"] = str(ports[2])
    engine.train_step = _failing_step
    try:
        engine.train(load_config(None, overrides + ['run.name="failing"']))
    except RuntimeError as err:
        seen["error"] = str(err)
    seen["own_group_ended_after_error"] = not dist.is_initialized()
    torch.save(seen, os.path.join(out_dir, f"rank{rank}.pt"))


def test_train_ends_only_the_process_group_it_started(tmp_path):
    data = tiny_dataset(tmp_path / "data", num_train=6)
    overrides = tiny_overrides(data, tmp_path, **{"train.stop_after_steps": 1, "eval.every_epochs": 0})
    mp.spawn(_process_group_worker, args=(2, [_free_port() for _ in range(3)], overrides, str(tmp_path)), nprocs=2)
    for rank in range(2):
        seen = torch.load(tmp_path / f"rank{rank}.pt")
        assert seen == {
            "caller_group_kept": True,
            "own_group_ended": True,
            "error": "step failed on purpose",
            "own_group_ended_after_error": True,
        }


def test_train_resolves_the_device_once(tmp_path, monkeypatch):
    calls = []
    real_resolve = engine.resolve_device

    def counting_resolve(*args, **kwargs):
        calls.append(args)
        return real_resolve(*args, **kwargs)

    monkeypatch.setattr(engine, "resolve_device", counting_resolve)
    data = tiny_dataset(tmp_path / "data")
    engine.train(load_config(None, tiny_overrides(data, tmp_path, **{"train.stop_after_steps": 1})))
    assert len(calls) == 1

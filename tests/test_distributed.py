"""GPT under DistributedDataParallel and FSDP2 (fully_shard): 2 CPU processes on gloo, one training
step each, whose gradients must equal one process's on the whole batch.

Both run in the same two spawned processes (starting them costs more than the step). The float64
single-process gradients are the reference and the float32 single-process ones the error budget.

Teardown: the ranks meet at a barrier once rank 0 has saved the gradients, so that no rank closes its
gloo connections while the other still communicates, and each returns normally. The gloo worker threads
still outlive destroy_process_group (FSDP2's state keeps the group alive) into the interpreter's exit,
where once in ~20 runs a rank that had finished aborted ("terminate called without an active
exception"). So the parent waits for each rank itself, and accepts a rank killed by a signal only if it
had written its done file, after the barrier and the teardown: its gradients are saved by then, and
they are checked as usual.
"""

import copy
import os
import pickle
import signal
import socket
import time
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tolerance import assert_close
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from fastgpt.nn import GPT, GPTConfig

WORLD_SIZE = 2
TIMEOUT_S = 240
CONFIG = {"n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 97, "block_size": 64}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_gradients(state, idx, targets):
    model = GPT(GPTConfig(**CONFIG))
    model.load_state_dict(state)
    ddp = DistributedDataParallel(model)  # its reducer must live until backward has all-reduced the gradients
    ddp(idx, targets).backward()
    return {name: p.grad for name, p in model.named_parameters()}


def fsdp2_gradients(state, idx, targets):
    """{name: full gradient}; FSDP2's own gradients are DTensor shards."""
    model = GPT(GPTConfig(**CONFIG))
    model.load_state_dict(state)
    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)
    model(idx, targets).backward()
    return {name: p.grad.full_tensor() for name, p in model.named_parameters()}


def done_path(out_dir, rank):
    return os.path.join(out_dir, f"done-{rank}")


def worker(rank, port, state, idx, targets, out_dir):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        rows = slice(rank * idx.shape[0] // WORLD_SIZE, (rank + 1) * idx.shape[0] // WORLD_SIZE)
        grads = {
            "ddp": ddp_gradients(state, idx[rows], targets[rows]),
            "fsdp2": fsdp2_gradients(state, idx[rows], targets[rows]),
        }
        if rank == 0:
            torch.save(grads, os.path.join(out_dir, "grads.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    with open(done_path(out_dir, rank), "w"):
        pass


def run_workers(port, state, idx, targets, out_dir):
    """Waits for every rank on its own: mp.spawn's join kills the other ranks as soon as one fails,
    which would turn one rank's death at exit into a missing result of the other."""
    context = mp.spawn(worker, args=(port, state, idx, targets, out_dir), nprocs=WORLD_SIZE, join=False)
    deadline = time.monotonic() + TIMEOUT_S
    for process in context.processes:
        process.join(max(0.0, deadline - time.monotonic()))
    if any(process.is_alive() for process in context.processes):
        for process in context.processes:
            process.kill()
        pytest.fail(f"distributed workers did not finish in {TIMEOUT_S} s")
    for rank, process in enumerate(context.processes):
        if process.exitcode == 0:
            continue
        if process.exitcode < 0 and os.path.exists(done_path(out_dir, rank)):
            warnings.warn(
                f"rank {rank} finished its step and its teardown, then died of "
                f"{signal.Signals(-process.exitcode).name} as its interpreter exited",
                stacklevel=2,
            )
            continue
        error = context.error_files[rank]
        if os.path.exists(error):
            with open(error, "rb") as file:
                pytest.fail(f"rank {rank} failed:\n{pickle.load(file)}")
        pytest.fail(f"rank {rank} exited with code {process.exitcode} before it had finished")


def test_ddp_and_fsdp2_gradients_match_single_process(tmp_path):
    model = GPT(GPTConfig(**CONFIG))
    idx = torch.randint(0, 97, (4, 32))
    targets = torch.randint(0, 97, (4, 32))
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    run_workers(free_port(), state, idx, targets, str(tmp_path))

    model(idx, targets).backward()
    model64 = copy.deepcopy(model).double()
    model64.zero_grad()
    model64(idx, targets).backward()
    results = torch.load(tmp_path / "grads.pt")
    single = dict(model.named_parameters())
    for parallel, grads in results.items():
        assert set(grads) == set(single), parallel
        for name, parameter in model64.named_parameters():
            assert_close(f"{parallel} grad {name}", grads[name], parameter.grad, single[name].grad)

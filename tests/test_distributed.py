"""GPT under DistributedDataParallel and FSDP2 (fully_shard): 2 CPU processes on gloo, one training
step each, whose gradients must equal one process's on the whole batch.

Both run in the same two spawned processes (starting them costs more than the step). The float64
single-process gradients are the reference and the float32 single-process ones the error budget.
"""

import copy
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tolerance import assert_close

from fastgpt.nn import GPT, GPTConfig

WORLD_SIZE = 2
TIMEOUT_S = 240
CONFIG = {"n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 97, "block_size": 64}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shard_gradients(model):
    """{name: full gradient} of an FSDP2 model, whose gradients are DTensor shards."""
    return {name: p.grad.full_tensor() for name, p in model.named_parameters()}


def worker(rank, port, state, idx, targets, out_dir):
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        rows = slice(rank * idx.shape[0] // WORLD_SIZE, (rank + 1) * idx.shape[0] // WORLD_SIZE)

        model = GPT(GPTConfig(**CONFIG))
        model.load_state_dict(state)
        ddp = DistributedDataParallel(model)
        ddp(idx[rows], targets[rows]).backward()
        ddp_grads = {name: p.grad for name, p in model.named_parameters()}

        model = GPT(GPTConfig(**CONFIG))
        model.load_state_dict(state)
        for block in model.transformer.h:
            fully_shard(block)
        fully_shard(model)
        model(idx[rows], targets[rows]).backward()
        fsdp_grads = shard_gradients(model)
        if rank == 0:
            torch.save({"ddp": ddp_grads, "fsdp2": fsdp_grads}, os.path.join(out_dir, "grads.pt"))
    finally:
        dist.destroy_process_group()


def run_workers(*args):
    context = mp.spawn(worker, args=args, nprocs=WORLD_SIZE, join=False)
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"distributed workers did not finish in {TIMEOUT_S} s")


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

"""Process-group setup from the environment (torchrun, torch.distributed.launch --use_env, SLURM) or none.

The collectives themselves live in ``utils`` (models and datasets use them too); they are re-exported here.
"""
import datetime
import os

import torch
import torch.distributed as dist

from utils import (all_gather_object, all_reduce_sum, barrier, broadcast_object, comm_device, concat_all_gather,  # noqa: F401
                   get_rank, get_world_size, is_dist, is_main_process, set_comm_device)


def backend_for(use_cuda):
    """NCCL for CUDA tensors plus gloo for CPU ones on a GPU run: a CPU tensor or object always has a backend."""
    return "cpu:gloo,cuda:nccl" if use_cuda else "gloo"


def init_distributed(device="cuda", force=False):
    """Initialise from env vars if a launcher set them; otherwise one plain process. Returns (rank, world, local).

    ``force`` builds a process group even for one process (``--force_process_group``), so that a one-GPU run
    still sends every collective through NCCL, as a multi-GPU run does.
    """
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    elif "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        local = int(env.get("SLURM_LOCALID", 0))
        env.setdefault("MASTER_PORT", "29500")
        if "MASTER_ADDR" not in env:
            raise RuntimeError("SLURM run without MASTER_ADDR: export MASTER_ADDR=<first node's hostname>")
    elif force:
        rank, world, local = 0, 1, 0
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", "29599")
        env.setdefault("RANK", "0")
        env.setdefault("WORLD_SIZE", "1")
    else:
        return 0, 1, 0
    if world == 1 and not force:
        return 0, 1, 0
    use_cuda = str(device).startswith("cuda") and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local)
    set_comm_device(f"cuda:{local}" if use_cuda else "cpu")
    dist.init_process_group(backend=backend_for(use_cuda), init_method="env://", world_size=world, rank=rank,
                            timeout=datetime.timedelta(minutes=30))
    barrier()
    return rank, world, local

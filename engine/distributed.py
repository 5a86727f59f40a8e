"""Distributed setup from the environment (torchrun, torch.distributed.launch --use_env, SLURM) or none."""
import datetime
import os

import torch
import torch.distributed as dist


def is_dist():
    return dist.is_available() and dist.is_initialized()


def get_rank():
    return dist.get_rank() if is_dist() else 0


def get_world_size():
    return dist.get_world_size() if is_dist() else 1


def is_main_process():
    return get_rank() == 0


def barrier():
    if is_dist():
        dist.barrier()


def init_distributed(device="cuda"):
    """Initialise from env vars if a launcher set them; otherwise one plain process. Returns (rank, world, local)."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    elif "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        local = int(env.get("SLURM_LOCALID", 0))
        env.setdefault("MASTER_PORT", "29500")
        if "MASTER_ADDR" not in env:
            raise RuntimeError("SLURM run without MASTER_ADDR: export MASTER_ADDR=<first node's hostname>")
    else:
        return 0, 1, 0
    if world == 1:
        return 0, 1, 0
    use_cuda = str(device).startswith("cuda") and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local)
    backend = "nccl" if use_cuda else "gloo"
    dist.init_process_group(backend=backend, init_method="env://", world_size=world, rank=rank,
                            timeout=datetime.timedelta(minutes=30))
    dist.barrier()
    return rank, world, local


@torch.no_grad()
def concat_all_gather(tensor):
    """All-gather along dim 0 in rank order (no gradient); identity in a single process."""
    if not is_dist():
        return tensor
    out = [torch.empty_like(tensor) for _ in range(get_world_size())]
    dist.all_gather(out, tensor.contiguous())
    return torch.cat(out, dim=0)


def all_gather_object(obj):
    if not is_dist():
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(tensor):
    if is_dist():
        dist.all_reduce(tensor)
    return tensor

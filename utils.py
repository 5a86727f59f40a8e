"""Leaf helpers every layer may use (models/, dataset/, engine/, tools): rank, world size, collectives.

Every collective of the project goes through these functions. A tensor is sent on ``comm_device()`` (the
rank's GPU when the group has NCCL, the CPU otherwise) and comes back on the device it came from, so a CPU
counter works on a GPU run and a GPU tensor never takes the slow gloo path. The process group of a GPU run
also has a CPU backend (``cpu:gloo,cuda:nccl``, see ``engine.distributed``).

``ALBEF_CHECK_COLLECTIVES=1`` (tests) records every collective with the device it ran on and refuses any
``torch.distributed`` collective that does not come through here.
"""
import json
import os
import threading

import torch
import torch.distributed as dist

_COMM_DEVICE = None
_inside = threading.local()
CHECK_LOG = []   # (op, device type, bytes) of every collective, when checking


def is_dist():
    return dist.is_available() and dist.is_initialized()


def get_rank():
    return dist.get_rank() if is_dist() else 0


def get_world_size():
    return dist.get_world_size() if is_dist() else 1


def is_main_process():
    return get_rank() == 0


def set_comm_device(device):
    global _COMM_DEVICE
    _COMM_DEVICE = torch.device(device)


def comm_device():
    """Where collective tensors travel: the rank's GPU under NCCL, else the CPU."""
    if _COMM_DEVICE is not None:
        return _COMM_DEVICE
    if is_dist() and "nccl" in str(dist.get_backend()).lower() and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class _Collective:
    """Marks a collective as coming through this module (for the check mode) and logs it."""

    def __init__(self, op, tensor=None, nbytes=0):
        self.op, self.tensor, self.nbytes = op, tensor, nbytes

    def __enter__(self):
        _inside.active = True
        if CHECKING:
            dev = self.tensor.device.type if self.tensor is not None else "object"
            nbytes = self.nbytes or (self.tensor.numel() * self.tensor.element_size() if self.tensor is not None else 0)
            CHECK_LOG.append((self.op, dev, int(nbytes)))

    def __exit__(self, *exc):
        _inside.active = False


def barrier():
    if is_dist():
        with _Collective("barrier"):
            if comm_device().type == "cuda":
                dist.barrier(device_ids=[comm_device().index])
            else:
                dist.barrier()


def _send(tensor):
    return tensor.detach().to(comm_device()).contiguous()


def _back(tensor, like):
    return tensor.to(like.device)


@torch.no_grad()
def concat_all_gather(tensor):
    """All-gather along dim 0 in rank order (no gradient); identity in a single process."""
    if not is_dist():
        return tensor
    t = _send(tensor)
    out = [torch.empty_like(t) for _ in range(get_world_size())]
    with _Collective("all_gather", t):
        dist.all_gather(out, t)
    return _back(torch.cat(out, dim=0), tensor)


@torch.no_grad()
def all_reduce_sum(tensor):
    """Sum over ranks, in place; returns the input tensor (on its own device)."""
    if not is_dist():
        return tensor
    t = _send(tensor)
    with _Collective("all_reduce", t):
        dist.all_reduce(t)
    if t is not tensor:
        tensor.copy_(_back(t, tensor))
    return tensor


def all_gather_object(obj):
    """Small picklable objects only (RNG states, per-rank summaries): the payload goes to every rank."""
    if not is_dist():
        return [obj]
    out = [None] * get_world_size()
    with _Collective("all_gather_object", nbytes=_pickled_size(obj) if CHECKING else 0):
        dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src=0):
    if not is_dist():
        return obj
    box = [obj]
    with _Collective("broadcast_object", nbytes=_pickled_size(obj) if CHECKING else 0):
        dist.broadcast_object_list(box, src=src)
    return box[0]


def _pickled_size(obj):
    import io
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.tell()


# ---------------------------------------------------------------------------------------------- check mode
CHECKING = os.environ.get("ALBEF_CHECK_COLLECTIVES", "") not in ("", "0")
_GUARDED = ("all_reduce", "all_gather", "all_gather_object", "broadcast", "broadcast_object_list", "gather",
            "gather_object", "reduce", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor", "barrier",
            "scatter", "all_to_all")


def _guard(name, fn):
    def wrapper(*a, **k):
        if not getattr(_inside, "active", False):
            raise RuntimeError(f"torch.distributed.{name} called outside utils.py: every collective must go "
                               "through utils (device placement, logging)")
        return fn(*a, **k)
    return wrapper


def install_check():
    """Refuse direct torch.distributed collectives; write the log to $ALBEF_CHECK_COLLECTIVES_LOG at exit."""
    for name in _GUARDED:
        if hasattr(dist, name):
            setattr(dist, name, _guard(name, getattr(dist, name)))
    path = os.environ.get("ALBEF_CHECK_COLLECTIVES_LOG")
    if path:
        import atexit

        def dump():
            with open(f"{path}.rank{get_rank()}", "w") as f:
                json.dump({"comm_device": str(comm_device()), "log": CHECK_LOG}, f)
        atexit.register(dump)


if CHECKING:
    install_check()

"""Leaf helpers every layer may use (models/, dataset/, engine/, tasks/, tools): rank, world size, collectives,
per-rank result files.

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


class _GatherWithGrad(torch.autograd.Function):
    """Forward: every rank's rows, rank-major. Backward: each rank's rows get the sum over ranks of their
    gradient, so a loss computed on every rank over the gathered rows trains this rank's rows as one process
    over the whole batch would (with DDP's mean over ranks)."""

    @staticmethod
    def forward(ctx, tensor):
        ctx.n = tensor.shape[0]
        return concat_all_gather(tensor)

    @staticmethod
    def backward(ctx, grad):
        grad = all_reduce_sum(grad.contiguous().clone())
        r = get_rank()
        return grad[r * ctx.n:(r + 1) * ctx.n]


def all_gather_with_grad(tensor):
    """All-gather along dim 0 in rank order that keeps the gradient (equal row counts on every rank)."""
    if not is_dist():
        return tensor
    return _GatherWithGrad.apply(tensor)


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


# ---------------------------------------------------------------------------------------------- result files
def save_result(result, result_dir, name, key=None, order=None):
    """Each rank writes its part (``name_rankN.json``); rank 0 merges them into ``name.json`` (deduplicated on
    ``key``, in rank order, or sorted by ``order(item)``) and returns the merged list; other ranks return None.
    Collective."""
    os.makedirs(result_dir, exist_ok=True)
    part = os.path.join(result_dir, f"{name}_rank{get_rank()}.json")
    _write_json(result, part)
    barrier()
    merged = None
    if is_main_process():
        merged, seen = [], set()
        for r in range(get_world_size()):
            p = os.path.join(result_dir, f"{name}_rank{r}.json")
            with open(p, encoding="utf-8") as f:
                for item in json.load(f):
                    k = item[key] if key else None
                    if key is None or k not in seen:
                        seen.add(k)
                        merged.append(item)
            os.remove(p)
        if order is not None:
            merged.sort(key=order)
        _write_json(merged, os.path.join(result_dir, f"{name}.json"))
    barrier()
    return merged


def save_json(result_dir, name, obj):
    """``result_dir/name.json``, written atomically (main process)."""
    _write_json(obj, os.path.join(result_dir, f"{name}.json"))


def read_partial_jsonl(path):
    """The records of a resumable tool's progress file; a line cut by an interruption is skipped (redone)."""
    out = []
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    return out


def _write_json(obj, path):
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def shard(n, rank=None, world=None):
    """This rank's contiguous share of ``range(n)``: every item once over all ranks, no padding."""
    rank = get_rank() if rank is None else rank
    world = get_world_size() if world is None else world
    return range(rank * n // world, (rank + 1) * n // world)


# ---------------------------------------------------------------------------------------------- VQA accuracy
# The official VQA evaluation's answer normalisation (VQA API, vqaEval.py): punctuation, number words,
# articles and apostrophe-less contractions.

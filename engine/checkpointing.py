"""Atomic training checkpoints that hold everything a mid-epoch resume needs."""
import contextlib
import glob
import os
import random
import re
import shutil

import numpy as np
import torch

from models.checkpoint import load_file

LATEST = "latest"   # a text file in output_dir naming the newest checkpoint


class _Tracked:
    """The file a save writes through: counts the bytes and keeps the first OSError of a write, because torch's
    zip writer reports a failed write (a full disk) as a RuntimeError ("unexpected pos ...")."""

    def __init__(self, f):
        self.f, self.written, self.error = f, 0, None

    def write(self, data):
        try:
            n = self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise
        self.written += len(data)
        return n

    def __getattr__(self, name):   # flush, fileno, ... of the real file
        return getattr(self.f, name)


def payload_bytes(obj, seen=None):
    """About the bytes ``obj`` takes once saved: its tensors' storages (each once) and its strings."""
    seen = set() if seen is None else seen
    if torch.is_tensor(obj):
        st = obj.untyped_storage()
        key = (st.data_ptr(), st.nbytes())
        if key in seen:
            return 0
        seen.add(key)
        return st.nbytes()
    if isinstance(obj, dict):
        return sum(payload_bytes(k, seen) + payload_bytes(v, seen) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return sum(payload_bytes(v, seen) for v in obj)
    if isinstance(obj, (str, bytes)):
        return len(obj)
    return 8


def _mib(n):
    return f"{n / 2 ** 20:.1f} MiB"


def _write_atomic(path, write, mode, needed=None):
    """Write to a temporary file in the same folder, fsync, then rename: a kill leaves the old file intact.
    A failed write (a full disk) removes the temporary file at once and names the path, the bytes the file
    needs and the free space; the file it replaces (the previous checkpoint, ``latest``) stays as it was."""
    tmp = f"{path}.tmp.{os.getpid()}"
    tracked = None
    try:
        with open(tmp, mode) as f:
            tracked = _Tracked(f)
            write(tracked)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        cause = e if isinstance(e, OSError) else (tracked.error if tracked is not None else None)
        if cause is None:   # not a write failure (an unpicklable object, ...): as it was raised
            raise
        folder = os.path.dirname(os.path.abspath(path))
        try:
            free = f"{_mib(shutil.disk_usage(folder).free)} free in {folder}"
        except OSError:
            free = f"free space of {folder} unknown"
        need = f"needs about {_mib(needed)}" if needed else "size unknown"
        wrote = f", {_mib(tracked.written)} written when it failed" if tracked is not None and tracked.written else ""
        raise OSError(cause.errno, f"could not write {path!r}: {cause.strerror or cause} ({need}{wrote}; {free}); "
                      "the partial file was removed") from None


def atomic_save(obj, path):
    _write_atomic(path, lambda f: torch.save(obj, f), "wb", needed=payload_bytes(obj))


def atomic_write_text(text, path):
    _write_atomic(path, lambda f: f.write(text), "w", needed=len(text.encode()))


def atomic_write_bytes(data, path):
    _write_atomic(path, lambda f: f.write(data), "wb", needed=len(data))


def rng_state():
    """This rank's RNG streams, in types that load with weights_only=True."""
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                       "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def step_name(step):
    return f"checkpoint_step{step:08d}.pth"


def epoch_name(epoch):
    return f"checkpoint_{epoch:02d}.pth"   # ALBEF's name


def rank_path(path, rank):
    """Where rank ``rank`` (> 0) keeps its own state of checkpoint ``path`` (RNG, GRIT's queue, counters)."""
    return f"{path[:-len('.pth')]}.rank{rank:03d}.pth"


def load_rank_state(path, rank):
    p = rank_path(path, rank)
    if not os.path.isfile(p):
        print(f"note: {p} is missing: rank {rank} resumes without its own state (RNG, queues, counters)")
        return None
    return load_file(p, config_key="--resume")


def save_checkpoint(state, output_dir, name, keep_last=0, keep_epochs=0):
    """Write ``name`` atomically and point ``latest`` at it; keep the last ``keep_last`` step checkpoints and,
    with ``keep_epochs``, the last ``keep_epochs`` epoch checkpoints (0: every one, ALBEF's convention)."""
    path = os.path.join(output_dir, name)
    atomic_save(state, path)
    atomic_write_text(name, os.path.join(output_dir, LATEST))
    if keep_epochs and re.fullmatch(r"checkpoint_\d+\.pth", name):
        epochs = sorted(p for p in glob.glob(os.path.join(output_dir, "checkpoint_*.pth"))
                        if re.search(r"checkpoint_\d+\.pth$", p))
        for old in epochs[:-keep_epochs]:
            for f in [old] + glob.glob(old[:-len(".pth")] + ".rank*.pth"):
                os.remove(f)
    if keep_last and name.startswith("checkpoint_step"):
        steps = sorted(p for p in glob.glob(os.path.join(output_dir, "checkpoint_step*.pth"))
                       if re.search(r"checkpoint_step\d+\.pth$", p))
        for old in steps[:-keep_last]:
            for f in [old] + glob.glob(old[:-len(".pth")] + ".rank*.pth"):
                os.remove(f)
    return path


def resolve_resume(resume, output_dir):
    """``--resume`` value -> checkpoint path or None. 'latest' with nothing saved yet starts fresh."""
    if not resume:
        return None
    if resume != "latest":
        if not os.path.isfile(resume):
            raise FileNotFoundError(f"--resume: no such checkpoint {resume!r}")
        return resume
    pointer = os.path.join(output_dir, LATEST)
    if os.path.isfile(pointer):
        with open(pointer) as f:
            path = os.path.join(output_dir, f.read().strip())
        if os.path.isfile(path):
            return path
    found = sorted(glob.glob(os.path.join(output_dir, "checkpoint_*.pth")), key=os.path.getmtime)
    found = [p for p in found if re.search(r"checkpoint_(step\d+|\d+)\.pth$", p)]
    return found[-1] if found else None


def load_training_checkpoint(path):
    return load_file(path, config_key="--resume")

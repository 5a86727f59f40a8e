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


def _write_atomic(path, write, mode):
    """Write to a temporary file in the same folder, fsync, then rename: a kill leaves the old file intact.
    A failed write (a full disk) removes the temporary file and names the path and the free space."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        folder = os.path.dirname(os.path.abspath(path))
        try:
            free = f"{shutil.disk_usage(folder).free / 2 ** 30:.2f} GiB free in {folder}"
        except OSError:
            free = f"free space of {folder} unknown"
        raise OSError(e.errno, f"could not write {path!r}: {e.strerror or e} ({free})") from None


def atomic_save(obj, path):
    _write_atomic(path, lambda f: torch.save(obj, f), "wb")


def atomic_write_text(text, path):
    _write_atomic(path, lambda f: f.write(text), "w")


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


def save_checkpoint(state, output_dir, name, keep_last=0):
    path = os.path.join(output_dir, name)
    atomic_save(state, path)
    atomic_write_text(name, os.path.join(output_dir, LATEST))
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

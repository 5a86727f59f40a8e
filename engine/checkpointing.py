"""Atomic training checkpoints that hold everything a mid-epoch resume needs."""
import glob
import os
import random
import re

import numpy as np
import torch

from models.checkpoint import load_file

LATEST = "latest"   # a text file in output_dir naming the newest checkpoint


def atomic_save(obj, path):
    """Write to a temporary file in the same folder, fsync, then rename: a kill leaves the old file intact."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(text, path):
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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


def save_checkpoint(state, output_dir, name, keep_last=0):
    path = os.path.join(output_dir, name)
    atomic_save(state, path)
    atomic_write_text(name, os.path.join(output_dir, LATEST))
    if keep_last and name.startswith("checkpoint_step"):
        steps = sorted(glob.glob(os.path.join(output_dir, "checkpoint_step*.pth")))
        for old in steps[:-keep_last]:
            os.remove(old)
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

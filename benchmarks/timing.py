"""Wall-clock timing shared by the benchmarks (CUDA work is synchronised before and after)."""
import time

import torch


def timed(fn, device):
    """(fn(), seconds)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t


def median_step_time(step, steps, warmup, device, after=None):
    """Median seconds of ``step()`` over ``steps`` calls after ``warmup`` untimed ones; ``after(out)`` runs
    outside the timing (reading counts syncs)."""
    times = []
    for i in range(warmup + steps):
        out, sec = timed(step, device)
        if i >= warmup:
            times.append(sec)
            if after is not None:
                after(out)
    return sorted(times)[len(times) // 2]

"""Trainer components: what a method adds to the loop, through one small protocol.

The trainer calls, on every rank and in the same order:
``on_epoch_start(epoch, resumed_mid_epoch)``, ``on_step_end(out, batch, step)`` after each step (``out`` is the
model's dict: losses, detached ``feats``, ``count_*``; ``batch`` the collated batch),
``on_epoch_end(epoch, stopped)`` -> dict of logged stats (may be collective), and for checkpoints
``state_dict`` / ``load_state_dict`` (the same on every rank: saved once) and ``rank_state_dict`` /
``load_rank_state_dict`` (this rank's own: saved in its own file). Every hook is optional.
"""
import sys

import torch

from dataset.grit import batch_hardness
from utils import all_reduce_sum


class Component:
    def on_epoch_start(self, epoch, resumed_mid_epoch=False):
        pass

    def on_step_end(self, out, batch, step):
        pass

    def on_epoch_end(self, epoch, stopped=False):
        return {}

    def state_dict(self):
        return None

    def load_state_dict(self, state):
        pass

    def rank_state_dict(self):
        return None

    def load_rank_state_dict(self, state):
        pass


class EpochSums(Component):
    """Per-epoch sums kept on the device (no sync per step), summed over ranks at the end of the epoch."""

    def __init__(self):
        self.sums = {}

    def add(self, key, value):
        v = value.detach().double()
        self.sums[key] = self.sums[key] + v if key in self.sums else v

    def on_epoch_start(self, epoch, resumed_mid_epoch=False):
        if not resumed_mid_epoch:
            self.sums = {}

    def totals(self, keys):
        """Collective: the sums of ``keys`` over every rank (0 where a rank had none)."""
        if not keys:
            return {}
        local = torch.stack([torch.as_tensor(self.sums.get(k, 0.0), dtype=torch.float64).cpu() for k in keys])
        return dict(zip(keys, all_reduce_sum(local).tolist()))

    def rank_state_dict(self):
        return {k: float(v) for k, v in self.sums.items()}   # one sync, at checkpoint time only

    def load_rank_state_dict(self, state):
        self.sums = {k: torch.tensor(v, dtype=torch.float64) for k, v in (state or {}).items()}


class StepCounts(EpochSums):
    """The model's ``count_*`` outputs (MAFA's ECM decisions, ...), logged as epoch totals without the prefix.

    The key set must be the same on every rank: a model emits its counts on every step or never."""

    def __init__(self, keys=()):
        super().__init__()
        self.keys = set(keys)

    def on_step_end(self, out, batch, step):
        for k, v in out.items():
            if k.startswith("count_"):
                self.keys.add(k)
                self.add(k, v)

    def on_epoch_end(self, epoch, stopped=False):
        return {k[len("count_"):]: int(v) for k, v in self.totals(sorted(self.keys)).items()}


class HardnessStats(EpochSums):
    """Mean in-batch similarity of each image's hardest and of all its negative texts, over the epoch's
    trained batches (``train_hard_neg_sim``, ``train_mean_neg_sim``); needs the model's ``feats``."""

    def on_step_end(self, out, batch, step):
        if "feats" in out:
            img, txt = out["feats"]
            h = batch_hardness(img, txt, len(img), itc=False)
            self.add("hard", h[0])
            self.add("mean", h[1])
            self.add("n", torch.ones((), device=h.device))

    def on_epoch_end(self, epoch, stopped=False):
        t = self.totals(["hard", "mean", "n"])
        if not t["n"]:
            return {}
        return {"train_hard_neg_sim": t["hard"] / t["n"], "train_mean_neg_sim": t["mean"] / t["n"]}


class BadImageError(RuntimeError):
    pass


class StreamPositions(Component):
    """Where each loader worker (role) of a streamed epoch stands: the newest trained batch's position, saved
    with this rank's state so a resumed epoch continues each worker's stream (dataset/shards.py)."""

    def __init__(self, stream):
        self.stream, self.pos = stream, {}
        self.warned = set()   # shards reported cut short: once per run, not once per pass

    def on_epoch_start(self, epoch, resumed_mid_epoch=False):
        if not resumed_mid_epoch:
            self.pos = {}
        self.stream.positions = dict(self.pos)

    def on_step_end(self, out, batch, step):
        role, pos = batch["stream_pos"]
        self.pos[int(role)] = int(pos)
        for shard, read, expected, error in batch.get("shards_cut", ()):
            if shard not in self.warned:   # every rank reports its own shards (rank > 0 does not print)
                self.warned.add(shard)
                lost = f"{expected - read} of {expected} samples" if expected is not None else \
                    f"the samples after the first {read}"
                sys.stderr.write(f"warning: shard {shard} is cut short ({error}): {lost} lost on every pass over it "
                                 "(warned once)\n")

    def rank_state_dict(self):
        return {"positions": {str(k): v for k, v in self.pos.items()}, "workers": self.stream.workers}

    def load_rank_state_dict(self, state):
        if not state:
            return
        if int(state.get("workers", -1)) != self.stream.workers:
            print(f"note: the streamed epoch was saved with {state.get('workers')} loader workers, resumed with "
                  f"{self.stream.workers}: its rest restarts each worker's stream (samples may repeat)")
            return
        self.pos = {int(k): int(v) for k, v in state["positions"].items()}


class BadImages(Component):
    """Unreadable images, counted once per requested sample (the dataset reports only the image of the index
    it was asked for, not the replacements it tried). Every ``check_every`` steps the counts are summed over
    ranks, so all ranks stop together (never one rank raising while the others wait in a collective);
    the check starts once ``min_seen`` samples were read."""

    def __init__(self, max_fraction=0.05, check_every=50, min_seen=1000):
        self.max_fraction, self.check_every, self.min_seen = float(max_fraction), int(check_every), min_seen
        self.count, self.seen, self.examples = 0, 0, []

    def add(self, bad, n):
        self.count += len(bad)
        self.seen += int(n)
        if bad and len(self.examples) < 5:
            self.examples += list(bad[:5 - len(self.examples)])

    def on_step_end(self, out, batch, step):
        self.add(batch.get("bad", []), batch.get("n", 0))
        if self.check_every and step % self.check_every == 0:
            self.check(final=False)

    def check(self, final):
        t = all_reduce_sum(torch.tensor([self.count, self.seen], dtype=torch.float64))
        count, seen = int(t[0]), int(t[1])
        frac = count / max(seen, 1)
        if (final or seen >= self.min_seen) and frac > self.max_fraction:
            raise BadImageError(
                f"{count} of {seen} images could not be read ({frac:.1%} > max_bad_image_fraction "
                f"{self.max_fraction:.1%}); first: {self.examples}. Check image_root and the annotation files. "
                "The last checkpoint is intact: fix the data and resume with --resume latest.")
        return {"count": count, "seen": seen, "first": list(self.examples)}

    def on_epoch_end(self, epoch, stopped=False):
        bad = self.check(final=True)
        if bad["count"]:
            print(f"skipped {bad['count']} unreadable images so far (first: {bad['first']})")
        return {"bad_images": bad}

    def rank_state_dict(self):
        return {"count": self.count, "seen": self.seen, "examples": list(self.examples)}

    def load_rank_state_dict(self, state):
        if state:
            self.count, self.seen, self.examples = int(state["count"]), int(state["seen"]), list(state["examples"])

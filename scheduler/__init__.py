"""ALBEF's ``schedular`` block -> timm's cosine scheduler, stepped with ALBEF's effective curve.

ALBEF warms up in blocks of 100 iterations during epoch 0 (``warmup_epochs`` counts blocks), then sets
one cosine value per epoch: epoch e >= 1 runs at t = e + warmup_epochs. ``lr_at(epoch, i)`` computes the
learning rate for iteration ``i`` of ``epoch`` from those rules, so a resumed run needs no scheduler state.
"""
from timm.scheduler import create_scheduler_v2

from schema import value


class ALBEFScheduler:
    def __init__(self, cfg, optimizer):
        c = {"schedular": cfg}
        sched = str(value(c, "schedular.sched"))
        self.warmup = int(value(c, "schedular.warmup_epochs"))
        self.block = int(value(c, "schedular.warmup_block"))
        epochs = int(value(c, "schedular.epochs"))
        lr = float(value(c, "schedular.lr"))
        # timm: with warmup_prefix the cosine runs over t_initial = num_epochs after the warm-up steps
        self.timm, _ = create_scheduler_v2(
            optimizer, sched=sched, num_epochs=epochs, min_lr=float(value(c, "schedular.min_lr")),
            warmup_lr=float(lr if value(c, "schedular.warmup_lr") is None else value(c, "schedular.warmup_lr")), warmup_epochs=self.warmup, warmup_prefix=True,
            decay_rate=float(value(c, "schedular.decay_rate")), cooldown_epochs=int(value(c, "schedular.cooldown_epochs")),
            cycle_limit=1)
        self.optimizer = optimizer
        self.epochs = epochs

    def t_at(self, epoch, i):
        if epoch == 0:
            return 0 if i == 0 else min((i - 1) // self.block, self.warmup)
        return epoch + self.warmup

    def step(self, epoch, i):
        """Set the optimizer's lr for iteration ``i`` of ``epoch``."""
        self.timm.step(self.t_at(epoch, i))

    def lr(self):
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self):
        return self.timm.state_dict()

    def load_state_dict(self, sd):
        self.timm.load_state_dict(sd)


def create_scheduler(cfg, optimizer):
    return ALBEFScheduler(cfg, optimizer)

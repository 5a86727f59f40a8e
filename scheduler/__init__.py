"""ALBEF's ``schedular`` block -> timm's cosine scheduler, stepped with ALBEF's effective curve.

ALBEF warms up in blocks of 100 iterations during epoch 0 (``warmup_epochs`` counts blocks), then sets
one cosine value per epoch: epoch e >= 1 runs at t = e + warmup_epochs. ``lr_at(epoch, i)`` computes the
learning rate for iteration ``i`` of ``epoch`` from those rules, so a resumed run needs no scheduler state.
"""
from timm.scheduler import create_scheduler_v2

WARMUP_BLOCK = 100


class ALBEFScheduler:
    def __init__(self, cfg, optimizer):
        sched = str(cfg.get("sched", "cosine"))
        self.warmup = int(cfg.get("warmup_epochs", 0))
        self.block = int(cfg.get("warmup_block", WARMUP_BLOCK))
        epochs = int(cfg["epochs"])
        # timm: with warmup_prefix the cosine runs over t_initial = num_epochs after the warm-up steps
        self.timm, _ = create_scheduler_v2(
            optimizer, sched=sched, num_epochs=epochs, min_lr=float(cfg.get("min_lr", 0.0)),
            warmup_lr=float(cfg.get("warmup_lr", cfg["lr"])), warmup_epochs=self.warmup, warmup_prefix=True,
            decay_rate=float(cfg.get("decay_rate", 1.0)), cooldown_epochs=int(cfg.get("cooldown_epochs", 0)),
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

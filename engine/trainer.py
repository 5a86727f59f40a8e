"""The one training engine every launcher uses.

A launcher gives: the model, the training dataset and its collate function, a ``step_fn(model, batch,
alpha)`` returning a dict of named losses (``loss_*``; a ``feats`` entry, the detached (image, text) ITC
features, feeds GRIT grouping when the config has a ``grit`` group; ``count_*`` entries are summed over
the epoch and logged), and optionally ``evaluate_fn(model, epoch)`` returning metrics.
The engine owns distribution, precision, the loop, accumulation, clipping, the schedule, logging,
bad-image accounting and checkpoints (atomic, every epoch and every N steps, resumable mid-epoch).
"""
import contextlib
import json
import os
import random
import subprocess

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from dataset.grit import Grit, GroupedSampler, batch_hardness
from dataset.sampler import ResumableDistributedSampler
from engine import checkpointing as ckpt_io
from engine.config import dump_config
from engine.distributed import all_gather_object, all_reduce_sum, barrier, get_rank, get_world_size, init_distributed
from engine.logger import MetricLogger, Progress, RunLog
from optim import create_optimizer
from scheduler import create_scheduler

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class BadImageError(RuntimeError):
    pass


class Env:
    """What ``setup`` found: rank, world size, device."""

    def __init__(self, rank, world, local, device):
        self.rank, self.world, self.local, self.device = rank, world, local, device

    @property
    def main(self):
        return self.rank == 0


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def setup(args):
    """Distributed init from the environment, device choice, seeds (model init uses the same seed on all ranks)."""
    want_cuda = str(args.device).startswith("cuda")
    if want_cuda and not torch.cuda.is_available():
        print("CUDA is not available: running on CPU")
        args.device = "cpu"
    rank, world, local = init_distributed(args.device)
    device = torch.device(f"cuda:{local}" if str(args.device).startswith("cuda") else args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    if rank != 0:   # keep the console readable: only rank 0 prints
        import builtins
        builtins.print = (lambda *a, **k: None)
    seed_everything(args.seed)
    return Env(rank, world, local, device)


def build(args, config, model_cls, remap=None):
    """A launcher's start: distributed setup, tokenizer, model, and ``--checkpoint`` weights (unless resuming).

    ``remap`` is the key surgery for a checkpoint of another task (e.g. ``strip_bert`` for retrieval).
    """
    from models.checkpoint import load_checkpoint
    from models.tokenization import ALBEFTokenizer
    env = setup(args)
    tokenizer = ALBEFTokenizer(config.get("tokenizer") or config.get("text_encoder") or "")
    model = model_cls(config, tokenizer)
    if args.checkpoint and not args.resume:
        load_checkpoint(model, args.checkpoint, remap=remap)
    return env, tokenizer, model


def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except Exception:   # noqa: BLE001
        return None


def autocast_context(precision, device):
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp32":
        return contextlib.nullcontext, "fp32"
    if precision == "bf16":
        return (lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)), "bf16"
    raise ValueError(f"config key 'precision' must be auto, fp32 or bf16, got {precision!r}")


class Trainer:
    def __init__(self, args, config, env, model, train_dataset, collate_fn, step_fn, evaluate_fn=None,
                 select_metric=None, batch_size_key="batch_size"):
        self.args, self.config, self.env = args, config, env
        self.model = model.to(env.device)
        self.dataset, self.collate_fn = train_dataset, collate_fn
        self.step_fn, self.evaluate_fn = step_fn, evaluate_fn
        self.select_metric = select_metric
        self.batch_size = int(config.get(batch_size_key) or config["batch_size"])
        self.output_dir = args.output_dir
        self.accum = int(config.get("grad_accum_steps", 1))
        self.clip = config.get("clip_grad")
        self.loss_weights = dict(config.get("loss_weights") or {})
        self.print_freq = int(config.get("print_freq", 50))
        self.ckpt_every = int(config.get("ckpt_every_steps", 0))
        self.keep_last = int(config.get("ckpt_keep_last", 2))
        self.max_bad = float(config.get("max_bad_image_fraction", 0.05))
        self.warm_up = config.get("warm_up", True)
        self.alpha = float(config.get("alpha", 0.0))
        self.max_steps = config.get("max_steps")
        self.autocast, self.precision = autocast_context(config.get("precision", "auto"), env.device)

    # ------------------------------------------------------------------ setup
    def _prepare_output(self):
        if self.env.main:
            os.makedirs(self.output_dir, exist_ok=True)
            dump_config(self.config, os.path.join(self.output_dir, "config.yaml"))
            with open(os.path.join(self.output_dir, "run_info.json"), "w") as f:
                json.dump({"git_commit": git_commit(), "world_size": self.env.world, "precision": self.precision,
                           "torch": torch.__version__, "argv": vars(self.args)}, f, indent=1, default=str)
        barrier()

    def _state(self, epoch, next_iter, global_step):
        rng = all_gather_object(ckpt_io.rng_state())
        return {"model": self.model_without_ddp.state_dict(), "optimizer": self.optimizer.state_dict(),
                "lr_scheduler": self.scheduler.state_dict(), "scaler": None, "config": self.config,
                "epoch": epoch, "iter": next_iter, "step": global_step, "rng": rng,
                "sampler": {"seed": self.sampler.seed, "epoch": epoch, "start_batch": next_iter},
                "bad_images": dict(self.bad), "world_size": self.env.world, "best": self.best,
                "grit": self.grit.state_dict() if self.grit else None}

    def save(self, epoch, next_iter, global_step, name):
        state = self._state(epoch, next_iter, global_step)   # collective (RNG gather): every rank calls it
        if self.env.main:
            path = ckpt_io.save_checkpoint(state, self.output_dir, name, self.keep_last)
            print(f"saved {path}")
        barrier()

    def resume(self, path):
        ck = ckpt_io.load_training_checkpoint(path)
        self.model_without_ddp.load_state_dict(ck["model"], strict=True)
        self.optimizer.load_state_dict(ck["optimizer"])
        self.scheduler.load_state_dict(ck["lr_scheduler"])
        if ck.get("world_size", self.env.world) != self.env.world:
            print(f"note: checkpoint was written with {ck['world_size']} ranks, resuming with {self.env.world}; "
                  "the data order of the rest of the epoch differs")
        rngs = ck.get("rng") or []
        if len(rngs) == self.env.world:
            ckpt_io.set_rng_state(rngs[self.env.rank])
        self.bad.update(ck.get("bad_images", {}))
        if self.grit and ck.get("grit"):
            self.grit.load_state_dict(ck["grit"])
        elif self.grit:
            print(f"note: {path} has no GRIT state; the next epoch starts in random order")
        self.best = ck.get("best")
        best_file = os.path.join(self.output_dir, "best.json")   # written after the epoch checkpoint: newer
        if os.path.isfile(best_file):
            with open(best_file) as f:
                self.best = json.load(f)
        epoch, it = int(ck["epoch"]), int(ck.get("iter", -1))
        print(f"resumed from {path}: epoch {epoch}, iteration {it}, step {ck.get('step')}")
        return epoch, it, int(ck.get("step", 0))

    # ------------------------------------------------------------------ loop
    def fit(self, resume=None):
        env, cfg = self.env, self.config
        self._prepare_output()
        self.optimizer = create_optimizer(cfg["optimizer"], self.model)
        self.scheduler = create_scheduler(cfg["schedular"], self.optimizer)
        self.model_without_ddp = self.model
        sampler_cls = GroupedSampler if cfg.get("grit") else ResumableDistributedSampler
        self.sampler = sampler_cls(len(self.dataset), self.batch_size, env.world, env.rank, shuffle=True,
                                   seed=self.args.seed)
        self.grit = None
        if cfg.get("grit"):
            self.grit = Grit(cfg["grit"], self.sampler, int(cfg["embed_dim"]), self.batch_size, self.args.seed,
                             env.rank, env.world, env.device, len(self.dataset))
        self.bad = {"count": 0, "seen": 0, "examples": []}
        self.best = None
        n_iters = self.sampler.num_batches
        start_epoch, start_iter, global_step = 0, 0, 0
        path = ckpt_io.resolve_resume(resume, self.output_dir)
        if resume and path is None:
            print(f"--resume {resume}: nothing saved in {self.output_dir} yet, starting fresh")
        if path:
            start_epoch, start_iter, global_step = self.resume(path)
            if start_iter < 0 or start_iter >= n_iters:   # epoch checkpoint (ALBEF's: epoch = last finished)
                start_epoch, start_iter = start_epoch + 1, 0
        else:
            seed_everything(self.args.seed + env.rank)
        model = self.model
        if env.world > 1:
            model = DDP(model, device_ids=[env.local] if env.device.type == "cuda" else None,
                        broadcast_buffers=False)   # queues are identical on every rank; don't resend them
        if cfg.get("compile"):
            model = torch.compile(model)
        self.run_log = RunLog(self.output_dir, env.main, cfg.get("tensorboard", True))
        epochs = int(cfg.get("train_epochs") or cfg["schedular"]["epochs"])   # GRIT: fewer than the schedule
        samples_per_step = self.batch_size * env.world
        stop = False
        for epoch in range(start_epoch, epochs):
            first = start_iter if epoch == start_epoch else 0
            metrics, progress = MetricLogger(), Progress(n_iters, f"Train epoch {epoch}", samples_per_step,
                                                         env.main, self.print_freq)
            self.sampler.set_epoch(epoch, first)
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(epoch)
            if self.grit:
                self.grit.start_epoch(epoch, resumed_mid_epoch=epoch == start_epoch and first > 0)
            if hasattr(self.model_without_ddp, "set_epoch"):
                self.model_without_ddp.set_epoch(epoch)
            counts = {}
            loader = DataLoader(self.dataset, batch_size=self.batch_size, sampler=self.sampler,
                                num_workers=int(cfg.get("num_workers", 4)), collate_fn=self.collate_fn,
                                pin_memory=env.device.type == "cuda", drop_last=True,
                                generator=torch.Generator().manual_seed(self.args.seed + epoch))
            model.train()
            for i, batch in enumerate(loader, start=first):
                self.scheduler.step(epoch, i)
                alpha = self.alpha * min(1.0, i / n_iters) if (epoch == 0 and self.warm_up) else self.alpha
                batch = {k: (v.to(env.device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
                with self.autocast():
                    out = self.step_fn(model, batch, alpha)
                losses = {k: v for k, v in out.items() if k.startswith("loss")}
                for k, v in out.items():
                    if k.startswith("count_"):   # stays on the device: no sync per step
                        counts[k] = counts.get(k, 0) + v.detach().double()
                if "feats" in out:   # in-batch hardness of every step, averaged over the epoch
                    b = len(out["feats"][0])
                    h = batch_hardness(*out["feats"], b, itc=False).double()
                    counts["hard_neg_sim_sum"] = counts.get("hard_neg_sim_sum", 0) + h[0]
                    counts["mean_neg_sim_sum"] = counts.get("mean_neg_sim_sum", 0) + h[1]
                    counts["hard_neg_sim_n"] = counts.get("hard_neg_sim_n", 0) + 1
                loss = sum(self.loss_weights.get(k, 1.0) * v for k, v in losses.items())
                (loss / self.accum).backward()
                boundary = (i + 1) % self.accum == 0 or i == n_iters - 1
                if boundary:
                    if self.clip:
                        torch.nn.utils.clip_grad_norm_(self.model.parameters(), float(self.clip))
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    global_step += 1
                if self.grit:   # features from before this step's update, as in GRIT
                    self.grit.push(out["feats"], batch["idx"])
                self._count_bad(batch)
                if i % self.print_freq == 0 or i == n_iters - 1:
                    metrics.update(**{k: v.item() for k, v in losses.items()}, lr=self.scheduler.lr())
                    self._check_bad(final=False)
                progress.step(i, metrics)
                if self.max_steps and global_step >= int(self.max_steps):
                    stop = True
                if boundary and self.ckpt_every and global_step % self.ckpt_every == 0 and i + 1 < n_iters:
                    self.save(epoch, i + 1, global_step, ckpt_io.step_name(global_step))
                if stop:
                    break
            stats = {f"train_{k}": v for k, v in metrics.synchronize().items()}
            bad = self._check_bad(final=True)
            if counts:
                keys = sorted(counts)
                totals = dict(zip(keys, all_reduce_sum(torch.stack([torch.as_tensor(counts[k], dtype=torch.float64)
                                                                    .cpu() for k in keys])).tolist()))
                n = totals.pop("hard_neg_sim_n", 0)
                if n:
                    stats["train_hard_neg_sim"] = totals.pop("hard_neg_sim_sum") / n
                    stats["train_mean_neg_sim"] = totals.pop("mean_neg_sim_sum") / n
                stats.update({k[len("count_"):]: int(v) for k, v in totals.items()})
            if self.grit and not stop:
                stats.update(self.grit.end_epoch(epoch))   # collective; sets the next epoch's order
            record = {**stats, "epoch": epoch, "step": global_step, "bad_images": bad,
                      "epoch_seconds": round(progress.elapsed(), 1),
                      "samples_per_second": round(progress.done * samples_per_step / max(progress.elapsed(), 1e-9), 2)}
            if stop:
                record["stopped_at_iter"] = i + 1
                self.save(epoch, i + 1, global_step, ckpt_io.step_name(global_step))
            else:
                self.save(epoch, n_iters, global_step, ckpt_io.epoch_name(epoch))
            if self.evaluate_fn and (stop or epoch == epochs - 1 or
                                     (cfg.get("eval_every") and (epoch + 1) % int(cfg["eval_every"]) == 0)):
                record.update(self.evaluate_fn(self.model_without_ddp, epoch))
                self._select(record, epoch)
            if env.main:
                print(json.dumps(record))
            self.run_log.write(record)
            self.run_log.scalars("train", record, epoch)
            if stop:
                break
        self.run_log.close()
        return record if start_epoch < epochs else {}

    def _select(self, record, epoch):
        """Keep ``checkpoint_best.pth`` (model only, ALBEF's file) for the best ``select_metric`` so far."""
        if not self.select_metric:
            return
        if self.select_metric not in record:
            raise KeyError(f"select_metric {self.select_metric!r} is not among the evaluation results "
                           f"{sorted(k for k in record if k.startswith(('val_', 'test_')))}")
        value = float(record[self.select_metric])
        if self.best is None or value > self.best["value"]:
            self.best = {"metric": self.select_metric, "value": value, "epoch": epoch}
            if self.env.main:
                ckpt_io.atomic_save({"model": self.model_without_ddp.state_dict(), "epoch": epoch,
                                     "config": self.config, "best": self.best},
                                    os.path.join(self.output_dir, "checkpoint_best.pth"))
                ckpt_io.atomic_write_text(json.dumps(self.best), os.path.join(self.output_dir, "best.json"))
                print(f"new best {self.select_metric} {value:.4f} at epoch {epoch}: saved checkpoint_best.pth")
            barrier()
        record["best_epoch"] = self.best["epoch"]

    # ------------------------------------------------------------------ bad images
    def _count_bad(self, batch):
        self.bad["count"] += len(batch.get("bad", []))
        self.bad["seen"] += int(batch.get("n", 0)) + len(batch.get("bad", []))
        if batch.get("bad") and len(self.bad["examples"]) < 5:
            self.bad["examples"] += batch["bad"][:5 - len(self.bad["examples"])]

    def _check_bad(self, final):
        """Local check mid-epoch (no sync); global totals at the end of the epoch."""
        count, seen = self.bad["count"], self.bad["seen"]
        if final:
            t = all_reduce_sum(torch.tensor([count, seen], dtype=torch.float64))
            count, seen = int(t[0]), int(t[1])
        frac = count / max(seen, 1)
        if (final or seen >= 1000) and frac > self.max_bad:
            raise BadImageError(
                f"{count} of {seen} images could not be read ({frac:.1%} > max_bad_image_fraction "
                f"{self.max_bad:.1%}); first: {self.bad['examples']}. Check image_root and the annotation files.")
        if final and count:
            print(f"skipped {count} unreadable images so far (first: {self.bad['examples']})")
        return {"count": count, "seen": seen, "first": self.bad["examples"]}


__all__ = ["Trainer", "setup", "Env", "get_rank", "get_world_size"]

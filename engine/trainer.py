"""The one training engine every launcher uses.

A launcher gives: the model (``model(batch, alpha)`` returns a dict of named losses, ``loss_*``, plus whatever
the components read: detached ``feats``, ``count_*``), the training dataset and its collate function, optionally ``evaluate_fn(model, epoch)`` returning metrics, and the components of
its method (``engine.components``: GRIT, statistics, ...). The engine owns distribution, precision, the
loop, accumulation, clipping, the schedule, logging, checkpoints (atomic, every epoch and every N steps,
resumable mid-epoch and mid-evaluation) and model selection; it knows no method by name.
"""
import contextlib
import glob
import json
import os
import random
import subprocess
import sys

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from dataset.transforms import normalize_uint8
from engine import checkpointing as ckpt_io
from engine.components import BadImageError, BadImages, HardnessStats, StepCounts, StreamPositions  # noqa: F401
from dataset.utils import AnnotationError
from engine.config import dump_config
from engine.distributed import all_reduce_sum, barrier, init_distributed
from engine.logger import MetricLogger, Progress, RunLog, note
from models.batch import to_device
from optim import create_optimizer
from scheduler import create_scheduler
from schema import ConfigError, value
from utils import get_rank, get_world_size  # noqa: F401 - re-exported

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DONE = "last_logged.json"   # the (epoch, step) of the newest record in log.txt


class OtherRankFailed(RuntimeError):
    """Raised on the ranks that did not fail, so that every rank stops together."""


USER_ERRORS = (ConfigError, AnnotationError, BadImageError, OtherRankFailed, OSError)


def launch(main):
    """Run a launcher's ``main``. What the user can fix (a config key, an annotation file, unreadable images, a
    full disk) ends the run with its message alone and exit code 1; ``ALBEF_TRACEBACK=1`` shows the
    traceback. Anything else is a bug and keeps its traceback."""
    try:
        main()
    except USER_ERRORS as e:
        if os.environ.get("ALBEF_TRACEBACK") == "1":
            raise
        rank = f" (rank {os.environ['RANK']})" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        sys.stderr.write(f"error{rank}: {e}\n")
        sys.stderr.flush()
        raise SystemExit(1) from None


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


@contextlib.contextmanager
def isolated_rng():
    """Run a block (an evaluation) without touching the caller's python / numpy / torch / CUDA RNG streams."""
    state = ckpt_io.rng_state()
    try:
        yield
    finally:
        ckpt_io.set_rng_state(state)


def setup(args):
    """Distributed init from the environment, device choice, seeds (model init uses the same seed on all ranks)."""
    want_cuda = str(args.device).startswith("cuda")
    if want_cuda and not torch.cuda.is_available():
        print("CUDA is not available: running on CPU")
        args.device = "cpu"
    rank, world, local = init_distributed(args.device, force=getattr(args, "force_process_group", False))
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


def default_components(config):
    """What every run gets: bad-image accounting, the model's ``count_*`` totals, in-batch hardness."""
    return {"bad_images": BadImages(value(config, "max_bad_image_fraction"), value(config, "print_freq")),
            "counts": StepCounts(), "hardness": HardnessStats()}


class Trainer:
    def __init__(self, args, config, env, model, train_dataset, collate_fn, evaluate_fn=None,
                 select_metric=None, batch_size_key="batch_size", components=None, sampler=None):
        self.args, self.config, self.env = args, config, env
        self.model = model.to(env.device)
        self.dataset, self.collate_fn = train_dataset, collate_fn
        self.evaluate_fn = evaluate_fn
        self.select_metric = select_metric
        self.batch_size = int(config.get(batch_size_key) or value(config, "batch_size"))
        self.output_dir = args.output_dir
        self.accum = int(value(config, "grad_accum_steps"))
        self.clip = value(config, "clip_grad")
        self.loss_weights = dict(value(config, "loss_weights"))
        self.print_freq = int(value(config, "print_freq"))
        self.ckpt_every = int(value(config, "ckpt_every_steps"))
        self.keep_last = int(value(config, "ckpt_keep_last"))
        self.keep_epochs = int(value(config, "keep_epoch_checkpoints"))
        self.alpha_warm_up = value(config, "alpha_warm_up")
        self.alpha = float(value(config, "alpha"))
        self.max_steps = value(config, "max_steps")
        self.eval_every = value(config, "eval_every")
        self.autocast, self.precision = autocast_context(value(config, "precision"), env.device)
        self.components = {**default_components(config), **(components or {})}
        # a component's own sampler (GRIT's grouped order) comes with it; else the resumable random one
        self.sampler = sampler
        self.stream = isinstance(train_dataset, torch.utils.data.IterableDataset)
        self._persistent = None   # the training loader, when its workers persist across epochs

    # ------------------------------------------------------------------ setup
    def _prepare_output(self):
        if self.env.main:
            os.makedirs(self.output_dir, exist_ok=True)
            for stale in glob.glob(os.path.join(self.output_dir, "*.tmp.*")):   # a save killed mid-write
                os.remove(stale)
                print(f"removed {stale} (left by an interrupted save)")
            dump_config(self.config, os.path.join(self.output_dir, "config.yaml"))
            with open(os.path.join(self.output_dir, "run_info.json"), "w") as f:
                json.dump({"git_commit": git_commit(), "world_size": self.env.world, "precision": self.precision,
                           "torch": torch.__version__, "argv": vars(self.args)}, f, indent=1, default=str)
        barrier()

    def _setup(self, resume):
        from dataset.sampler import ResumableDistributedSampler
        cfg, env = self.config, self.env
        self._prepare_output()
        self.optimizer = create_optimizer(cfg["optimizer"], self.model)
        self.scheduler = create_scheduler(cfg["schedular"], self.optimizer)
        weights = value(cfg, "train_weights")
        if self.stream:   # webdataset shards: the stream deals itself out (dataset/shards.py)
            self.sampler = self.dataset
            self.components.setdefault("stream", StreamPositions(self.dataset))
        elif self.sampler is None:
            sources = None
            if weights is not None:
                sizes = getattr(self.dataset, "source_sizes", None)
                if sizes is None or len(sizes) != len(weights):
                    raise ValueError(f"config key 'train_weights' has {len(weights)} values for "
                                     f"{'?' if sizes is None else len(sizes)} train_file sources")
                sources = list(zip(sizes, weights))
            self.sampler = ResumableDistributedSampler(len(self.dataset), self.batch_size, env.world, env.rank,
                                                       shuffle=True, seed=self.args.seed, sources=sources)
        elif weights is not None:
            raise ValueError("config key 'train_weights' cannot weigh this method's own sampler (GRIT's grouped "
                             "order keeps each item once per epoch); remove it or repeat files in train_file")
        self.n_iters = self.sampler.num_batches
        self.epochs = int(value(cfg, "train_epochs") or cfg["schedular"]["epochs"])   # GRIT: < the schedule
        self.metrics, self.best, self.last_record = MetricLogger(), None, {}
        self.start_epoch, self.start_iter, self.global_step = 0, 0, 0
        self.run_log = RunLog(self.output_dir, env.main, value(cfg, "tensorboard"))
        path = ckpt_io.resolve_resume(resume, self.output_dir)
        if resume and path is None:
            print(f"--resume {resume}: nothing saved in {self.output_dir} yet, starting fresh")
        if path:
            self.resume(path)
        else:
            seed_everything(self.args.seed + env.rank)
        model = self.model
        if env.world > 1:
            model = DDP(model, device_ids=[env.local] if env.device.type == "cuda" else None,
                        broadcast_buffers=False)   # queues are identical on every rank; don't resend them
        self.ddp = model if isinstance(model, DDP) else None
        if not value(cfg, "compile"):
            return model
        # alpha goes in as a 0-d tensor (see _step), so its ramp over epoch 0 recompiles nothing; the graph
        # break left in pretraining is the MLM's masked-position lookup (a data-dependent shape)
        return torch.compile(model, backend=value(cfg, "compile_backend"))

    # ------------------------------------------------------------------ loop
    def fit(self, resume=None):
        model = self._setup(resume)
        for epoch in range(self.start_epoch, self.epochs):
            first = self.start_iter if epoch == self.start_epoch else 0
            record, stopped_at = self._train_epoch(model, epoch, first)
            eval_due = self.evaluate_fn is not None and (stopped_at is not None or epoch == self.epochs - 1 or
                                                         bool(self.eval_every and (epoch + 1) % self.eval_every == 0))
            if stopped_at is not None:
                record["stopped_at_iter"] = stopped_at
            # the record goes into the checkpoint first: a run killed during the evaluation finishes it on resume
            name = ckpt_io.step_name(self.global_step) if stopped_at is not None else ckpt_io.epoch_name(epoch)
            self.save(epoch, stopped_at or self.n_iters, name, record=record, eval_due=eval_due)
            self._complete(epoch, record, eval_due)
            if stopped_at is not None:
                break
        self.run_log.close()
        self._persistent = None   # its workers exit
        return self.last_record

    def _train_epoch(self, model, epoch, first):
        env, n_iters = self.env, self.n_iters
        resumed = epoch == self.start_epoch and first > 0
        if not resumed:
            self.metrics = MetricLogger()
        later = (self.epochs - epoch - 1) * n_iters   # iterations of the epochs after this one

        def run_left(i):
            left = n_iters - i - 1 + later
            if self.max_steps:   # optimizer steps left, in loader iterations
                left = min(left, (int(self.max_steps) - self.global_step) * self.accum)
            return left
        progress = Progress(n_iters, f"Train epoch {epoch + 1}/{self.epochs}", self.batch_size * env.world, env.main,
                            self.print_freq, run_left=run_left)
        self.sampler.set_epoch(epoch, first)
        for obj in (self.dataset, self.model):
            if obj is not self.sampler and hasattr(obj, "set_epoch"):
                obj.set_epoch(epoch)
        for c in self.components.values():
            c.on_epoch_start(epoch, resumed)
        loader = self._loader(epoch)
        model.train()
        stopped_at = None
        for i, batch in enumerate(loader, start=first):
            out, boundary = self._step(model, batch, epoch, i)
            for c in self.components.values():
                c.on_step_end(out, batch, i)
            if i % self.print_freq == 0 or i == n_iters - 1:
                self.metrics.update(**{k: v.item() for k, v in out.items() if k.startswith("loss")},
                                    lr=self.scheduler.lr())
            progress.step(i, self.metrics)
            if self.max_steps and self.global_step >= int(self.max_steps):
                stopped_at = i + 1
                break
            if boundary and self.ckpt_every and self.global_step % self.ckpt_every == 0 and i + 1 < n_iters:
                self.save(epoch, i + 1, ckpt_io.step_name(self.global_step))
        record = {f"train_{k}": v for k, v in self.metrics.synchronize().items()}
        for c in self.components.values():
            record.update(c.on_epoch_end(epoch, stopped_at is not None))   # collective
        elapsed = max(progress.elapsed(), 1e-9)
        record.update(epoch=epoch, step=self.global_step, epoch_seconds=round(elapsed, 1),
                      samples_per_second=round(progress.done * self.batch_size * env.world / elapsed, 2))
        return record, stopped_at

    def _loader(self, epoch):
        """The training loader. Samples are seeded by (seed, epoch, index), never by a worker's RNG, so workers
        kept across epochs (``persistent_workers``) give the same batches as fresh ones: they get the epoch
        with every index."""
        from dataset.sampler import EpochTagged, EpochTaggedDataset
        cfg, workers = self.config, int(value(self.config, "num_workers"))
        pin = value(cfg, "pin_memory")
        pin = self.env.device.type == "cuda" if pin is None else bool(pin)
        prefetch = int(value(cfg, "prefetch_factor")) if workers else None
        if self.stream:   # workers yield whole batches; a fresh iterator each epoch (the epoch is in the copy)
            from dataset.shards import StreamCollate
            return DataLoader(self.dataset, batch_size=None, num_workers=workers, pin_memory=pin,
                              collate_fn=StreamCollate(self.collate_fn), prefetch_factor=prefetch,
                              generator=torch.Generator().manual_seed(self.args.seed + epoch))   # not the global RNG
        persistent = workers > 0 and bool(value(cfg, "persistent_workers"))
        if persistent and self._persistent is not None:
            self._persistent.sampler.epoch = epoch
            return self._persistent
        dataset, sampler = self.dataset, self.sampler
        if persistent:
            dataset, sampler = EpochTaggedDataset(dataset), EpochTagged(sampler)
            sampler.epoch = epoch
        loader = DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, num_workers=workers,
                            collate_fn=self.collate_fn, drop_last=True,
                            pin_memory=pin, prefetch_factor=prefetch,
                            persistent_workers=persistent,
                            generator=torch.Generator().manual_seed(self.args.seed + epoch))
        if persistent:
            self._persistent = loader
        return loader

    def _step(self, model, batch, epoch, i):
        """Forward, backward (without the gradient all-reduce on accumulation micro-batches) and, on an
        accumulation boundary, clip + optimizer step."""
        self.scheduler.step(epoch, i)
        alpha = self.alpha * min(1.0, i / self.n_iters) if (epoch == 0 and self.alpha_warm_up) else self.alpha
        # a 0-d tensor, not a float: a compiled step would take a float as a constant (one graph per value), and
        # eager and compiled runs then take the same branches (the teacher runs at alpha 0 too)
        alpha = torch.tensor(alpha, dtype=torch.float32)
        batch = to_device(batch, self.env.device)
        if batch.get("image") is not None and batch["image"].dtype == torch.uint8:   # uint8_images
            batch["image"] = normalize_uint8(batch["image"])
        boundary = (i + 1) % self.accum == 0 or i == self.n_iters - 1
        sync = self.ddp.no_sync() if (self.ddp is not None and not boundary) else contextlib.nullcontext()
        with sync:
            with self.autocast():
                out = model(batch, alpha=alpha)
            loss = sum(self.loss_weights.get(k, 1.0) * v for k, v in out.items() if k.startswith("loss"))
            (loss / self.accum).backward()
        if boundary:
            if self.clip:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), float(self.clip))
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.global_step += 1
        return out, boundary

    def _complete(self, epoch, record, eval_due):
        """Evaluate (own RNG streams: training's are untouched), select, log; then mark the epoch logged."""
        if eval_due:
            with isolated_rng():
                record.update(self.evaluate_fn(self.model, epoch))
            self._select(record, epoch)
        def write():
            print(json.dumps(record))
            self.run_log.write(record)
            self.run_log.scalars("train", record, epoch)
            ckpt_io.atomic_write_text(json.dumps({"epoch": epoch, "step": record.get("step")}),
                                      os.path.join(self.output_dir, DONE))
        self._main_writes(write)
        self.last_record = record

    # ------------------------------------------------------------------ checkpoints
    def _rank_state(self):
        return {"rng": ckpt_io.rng_state(), "metrics": self.metrics.state_dict(),
                "components": {n: c.rank_state_dict() for n, c in self.components.items()}}

    def save(self, epoch, next_iter, name, record=None, eval_due=False):
        """Collective. Ranks > 0 write their own state next to the checkpoint first; rank 0 then writes the
        checkpoint (with its own rank state) and the ``latest`` pointer. A failed write on any rank stops all
        of them with the path and the free space."""
        path = os.path.join(self.output_dir, name)
        rank_state, error = self._rank_state(), None
        try:
            if not self.env.main:
                ckpt_io.atomic_save(rank_state, ckpt_io.rank_path(path, self.env.rank))
        except Exception as e:   # noqa: BLE001 - shared below, so that no rank waits in a collective
            error = e
        self._raise_if_any(error)
        try:
            if self.env.main:
                state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                         "lr_scheduler": self.scheduler.state_dict(), "config": self.config,
                         "epoch": epoch, "iter": next_iter, "step": self.global_step, "world_size": self.env.world,
                         "sampler": {"seed": self.sampler.seed, "epoch": epoch, "start_batch": next_iter},
                         "best": self.best, "record": record, "eval_due": eval_due, "rank_state": rank_state,
                         "components": {n: c.state_dict() for n, c in self.components.items()}}
                ckpt_io.save_checkpoint(state, self.output_dir, name, self.keep_last, self.keep_epochs)
                # the rotating resume saves only in run.log; the epoch checkpoints (kept) on the console too
                note(self.output_dir, f"saved {path}", echo=not name.startswith("checkpoint_step"))
        except Exception as e:   # noqa: BLE001
            error = e
        if isinstance(error, OSError) and error.errno is not None:
            error = OSError(error.errno, f"{error.strerror}. The checkpoint named in {self.output_dir}/latest is "
                            "intact: free space and resume with --resume latest")
        self._raise_if_any(error)

    def _raise_if_any(self, error):
        """Collective: every rank raises when a write failed on any of them (no rank left in a collective)."""
        failed = all_reduce_sum(torch.tensor([0.0 if error is None else 1.0], dtype=torch.float64))
        if error is not None:
            raise error
        if failed.item():
            raise OtherRankFailed("a write to output_dir failed on another rank (see its error above); stopping. The "
                               "last checkpoint named in 'latest' is intact: free space and resume with --resume "
                               "latest")

    def _main_writes(self, write):
        """Run ``write`` on rank 0 only, then stop every rank if it failed (in place of a barrier)."""
        error = None
        try:
            if self.env.main:
                write()
        except Exception as e:   # noqa: BLE001
            error = e
        self._raise_if_any(error)

    def resume(self, path):
        env = self.env
        ck = ckpt_io.load_training_checkpoint(path)
        self.model.load_state_dict(ck["model"], strict=True)
        self.optimizer.load_state_dict(ck["optimizer"])
        self.scheduler.load_state_dict(ck["lr_scheduler"])
        same_world = ck.get("world_size", env.world) == env.world
        if not same_world:
            print(f"note: checkpoint was written with {ck['world_size']} ranks, resuming with {env.world}; "
                  "the data order of the rest of the epoch differs and per-rank state starts afresh")
        rank_state = None
        if same_world:
            rank_state = ck.get("rank_state") if env.main else ckpt_io.load_rank_state(path, env.rank)
        if rank_state:
            ckpt_io.set_rng_state(rank_state["rng"])
            self.metrics.load_state_dict(rank_state.get("metrics") or {})
        else:
            seed_everything(self.args.seed + env.rank)
        for n, c in self.components.items():
            if (ck.get("components") or {}).get(n) is not None:
                c.load_state_dict(ck["components"][n])
            c.load_rank_state_dict((rank_state or {}).get("components", {}).get(n))
        self.best = ck.get("best")
        best_file = os.path.join(self.output_dir, "best.json")   # written after the epoch checkpoint: newer
        if os.path.isfile(best_file):
            with open(best_file) as f:
                self.best = json.load(f)
        epoch, it, self.global_step = int(ck["epoch"]), int(ck.get("iter", -1)), int(ck.get("step", 0))
        print(f"resumed from {path}: epoch {epoch}, iteration {it}, step {self.global_step}")
        self.start_epoch, self.start_iter = epoch, it
        record = ck.get("record")
        if record is not None and not self._logged(epoch, self.global_step):   # killed before its log line
            print(f"finishing epoch {epoch}: {'evaluation and ' if ck.get('eval_due') else ''}log record")
            self._complete(epoch, dict(record), bool(ck.get("eval_due")) and self.evaluate_fn is not None)
        if record and record.get("stopped_at_iter") and self.max_steps and self.global_step >= int(self.max_steps):
            self.start_epoch = self.epochs   # the run had reached max_steps: nothing left to train
        elif it < 0 or it >= self.n_iters:   # an epoch-end checkpoint (ALBEF's: epoch = the last one done)
            self.start_epoch, self.start_iter = epoch + 1, 0

    def _logged(self, epoch, step):
        done = os.path.join(self.output_dir, DONE)
        if not os.path.isfile(done):
            return False
        with open(done) as f:
            last = json.load(f)
        return (int(last["epoch"]), int(last.get("step") or 0)) >= (epoch, step)

    def _select(self, record, epoch):
        """Keep ``checkpoint_best.pth`` (model only, ALBEF's file) for the best ``select_metric`` so far."""
        if not self.select_metric:
            return
        if self.select_metric not in record:
            raise KeyError(f"select_metric {self.select_metric!r} is not among the evaluation results "
                           f"{sorted(k for k in record if k.startswith(('val_', 'test_')))}")
        value_ = float(record[self.select_metric])
        if self.best is None or value_ > self.best["value"]:
            self.best = {"metric": self.select_metric, "value": value_, "epoch": epoch}

            def write():
                ckpt_io.atomic_save({"model": self.model.state_dict(), "epoch": epoch,
                                     "config": self.config, "best": self.best},
                                    os.path.join(self.output_dir, "checkpoint_best.pth"))
                ckpt_io.atomic_write_text(json.dumps(self.best), os.path.join(self.output_dir, "best.json"))
                print(f"new best {self.select_metric} {value_:.4f} at epoch {epoch}: saved checkpoint_best.pth")
            self._main_writes(write)
        record["best_epoch"] = self.best["epoch"]

    def load_best(self):
        """After ``fit``: load ``checkpoint_best.pth`` (selected on ``select_metric``) for the one test evaluation;
        returns what the test row says about the weights used."""
        from models.checkpoint import load_checkpoint
        best = os.path.join(self.output_dir, "checkpoint_best.pth")
        if self.select_metric and self.best is not None and os.path.isfile(best):
            load_checkpoint(self.model, best, strict=True, verbose=False)
            m = self.select_metric   # val_accuracy reads "val accuracy"; a short name (grounding's val_d) stays
            label = m.replace("_", " ", 1) if len(m.split("_", 1)[-1]) > 2 else m
            return {"epoch": self.best["epoch"], "checkpoint": f"checkpoint_best.pth (selected on {label})"}
        return {"checkpoint": "last epoch's weights (model_selection: last)"}


__all__ = ["Trainer", "setup", "Env", "get_rank", "get_world_size", "BadImageError", "launch"]

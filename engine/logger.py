"""Metric averaging, console progress with throughput and ETA, JSON-lines log and TensorBoard."""
import datetime
import json
import os
import sys
import time
from collections import defaultdict, deque

import torch

from utils import all_reduce_sum, is_dist


class SmoothedValue:
    def __init__(self, window=50):
        self.window = deque(maxlen=window)
        self.total, self.count = 0.0, 0

    def update(self, value, n=1):
        self.window.append(value)
        self.total += value * n
        self.count += n

    @property
    def avg(self):
        return sum(self.window) / max(len(self.window), 1)

    @property
    def global_avg(self):
        return self.total / max(self.count, 1)


class MetricLogger:
    def __init__(self, window=50):
        self.meters = defaultdict(lambda: SmoothedValue(window))

    def update(self, **kw):
        for k, v in kw.items():
            self.meters[k].update(float(v))

    def synchronize(self):
        """Global averages over all ranks (one all-reduce)."""
        if not is_dist():
            return {k: m.global_avg for k, m in self.meters.items()}
        keys = sorted(self.meters)
        t = torch.tensor([[self.meters[k].total, self.meters[k].count] for k in keys], dtype=torch.float64)
        all_reduce_sum(t)
        return {k: (t[i, 0] / max(t[i, 1], 1)).item() for i, k in enumerate(keys)}

    def state_dict(self):
        """Epoch totals, so that a run resumed mid-epoch logs averages over the whole epoch."""
        return {k: [m.total, m.count] for k, m in self.meters.items()}

    def load_state_dict(self, state):
        for k, (total, count) in state.items():
            self.meters[k].total, self.meters[k].count = float(total), int(count)

    def line(self):
        return "  ".join(f"{k}: {m.avg:.4g}" for k, m in sorted(self.meters.items()))


class Progress:
    """One line every ``print_freq`` steps: step, meters, samples/s, ETA (works in CI logs and terminals)."""

    def __init__(self, total, header, samples_per_step, enabled=True, print_freq=50, run_left=None):
        self.total, self.header, self.run_left = total, header, run_left
        self.samples_per_step = samples_per_step
        self.enabled, self.print_freq = enabled, print_freq
        self.start = self.last = time.time()
        self.done = 0

    def step(self, i, metrics):
        self.done += 1
        if not self.enabled or not (i % self.print_freq == 0 or i == self.total - 1):
            return
        now = time.time()
        rate = self.done * self.samples_per_step / max(now - self.start, 1e-9)
        eta = (self.total - i - 1) * self.samples_per_step / max(rate, 1e-9)
        run = ""
        if self.run_left is not None:   # the training left in the whole run (evaluations not counted)
            run_eta = max(self.run_left(i), 0) * self.samples_per_step / max(rate, 1e-9)
            run = f", run {datetime.timedelta(seconds=int(run_eta))}"
        print(f"{self.header} [{i + 1}/{self.total}]  {metrics.line()}  {rate:.1f} samples/s  "
              f"eta: epoch {datetime.timedelta(seconds=int(eta))}{run}", flush=True)
        sys.stdout.flush()

    def elapsed(self):
        return time.time() - self.start


class RunLog:
    """``log.txt`` (JSON lines, as ALBEF) and optional TensorBoard scalars, on the main process only."""

    def __init__(self, output_dir, enabled=True, tensorboard=True):
        self.enabled = enabled
        self.path = os.path.join(output_dir, "log.txt")
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(os.path.join(output_dir, "tensorboard"))
            except Exception as e:   # noqa: BLE001 - TensorBoard is optional
                print(f"TensorBoard disabled: {e}")

    def write(self, record):
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def scalars(self, prefix, values, step):
        if self.tb is None:
            return
        for k, v in values.items():
            if isinstance(v, (int, float)):
                self.tb.add_scalar(f"{prefix}/{k}", v, step)

    def close(self):
        if self.tb is not None:
            self.tb.close()


class Results:
    """Evaluation results in ``output_dir``: ``results.jsonl`` (one JSON object per evaluation) and
    ``results.md`` (the same as a table), rewritten after each evaluation. Main process only."""

    COLUMNS = ()   # the metrics shown in the console line and the table (subclasses / ``columns``)

    def __init__(self, output_dir, main=True, columns=None):
        if columns is not None:
            self.COLUMNS = tuple(columns)
        self.jsonl, self.md, self.main = os.path.join(output_dir, "results.jsonl"), \
            os.path.join(output_dir, "results.md"), main
        if main:
            os.makedirs(output_dir, exist_ok=True)

    def add(self, split, metrics, **info):
        row = {"split": split, **info, **{k: round(float(v), 4) for k, v in metrics.items()}}
        print(f"{split}: " + "  ".join(f"{k} {row[k]:.2f}" for k in self.COLUMNS if k in row))
        if not self.main:
            return row
        rows = self._rows()
        if "epoch" in row:   # an evaluation re-run on resume (killed after its row) replaces its row
            rows = [r for r in rows if (r.get("split"), r.get("epoch")) != (split, row["epoch"])]
        rows.append(row)
        tmp = f"{self.jsonl}.tmp.{os.getpid()}"
        with open(tmp, "w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
        os.replace(tmp, self.jsonl)
        self._table(rows)
        return row

    def _rows(self):
        if not os.path.isfile(self.jsonl):
            return []
        with open(self.jsonl) as f:
            return [json.loads(line) for line in f if line.strip()]

    def _table(self, rows):
        extra = [k for k in ("epoch", "checkpoint") if any(k in r for r in rows)]
        head = ["split", *extra, *self.COLUMNS]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            cells = [str(r.get(k, "")) if k in ("split", *extra) else f"{r[k]:.2f}" if k in r else "" for k in head]
            lines.append("| " + " | ".join(cells) + " |")
        with open(self.md, "w") as f:
            f.write("\n".join(lines) + "\n")


def final_summary(what, metrics, columns, output_dir, weights=None):
    """A run's last lines, for a person: the metric, the weights it was measured with, where the files are."""
    shown = "  ".join(f"{c} {float(metrics[c]):.2f}" for c in columns if c in metrics)
    print(f"\ndone: {what}" + (f": {shown}" if shown else "") + (f" ({weights})" if weights else ""))
    files = [f for f in ("results.md", "log.txt", "checkpoint_best.pth", "result") if
             os.path.exists(os.path.join(output_dir, f))]
    latest = os.path.join(output_dir, "latest")
    if os.path.isfile(latest):
        with open(latest) as f:
            files.append(f"last checkpoint {f.read().strip()}")
    print(f"      in {output_dir}: {', '.join(files) or 'nothing written'}", flush=True)


def note(output_dir, text, echo=True):
    """A line for ``output_dir/run.log`` (the run's readable history: saves, load reports), and the console."""
    import time
    if echo:
        print(text)
    try:
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, "run.log"), "a") as f:
            f.write(time.strftime("%Y-%m-%d %H:%M:%S ") + text.replace("\n", "\n    ") + "\n")
    except OSError:   # the log is a convenience: a full disk is reported by the checkpoint writes
        pass

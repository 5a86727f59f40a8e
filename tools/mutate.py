"""Mutation check of the test suite: put one small bug into the core code, run the fast tests, count the bugs
they catch.

    python tools/mutate.py                    # a seeded sample of 150 mutants, then the named bugs
    python tools/mutate.py --all              # every mutant (hours on 2 cores)
    python tools/mutate.py --file models/objectives/functional.py --sample 40

The mutants are token swaps on the code lines of the objectives, samplers and label rules (``TARGETS``):
arithmetic (+ - * /), comparisons, boolean constants and operators, small integer and float literals,
min/max; lines that only raise, print or build a message are left alone. ``NAMED`` adds the one-line bugs a
review once found that the suite missed. A survivor listed in ``EQUIVALENT`` (one that changes no observable
behaviour, with the reason) is reported apart and left out of the score. Each mutant runs ``pytest -x -m "not slow"`` on the test files
of its module (``TESTS``); a failing, crashing or hanging run counts as caught. Each mutant is written into a
copy of the repository (one per worker), never into the working tree; the heavy libraries are imported once
and each mutant's test run is a forked child.
"""
import argparse
import io
import os
import random
import shutil
import sys
import time
import tokenize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TARGETS = ["models/objectives/functional.py", "models/objectives/itc.py", "models/objectives/itm.py",
           "models/objectives/mlm.py", "models/objectives/hitc.py", "models/objectives/siglip.py", "models/base.py",
           "models/model_pretrain.py", "models/momentum.py",
           "models/objectives/ecm.py", "models/model_vqa.py", "models/model_nlvr.py", "models/model_ve.py",
           "models/objectives/hard_negatives.py", "models/objectives/mim.py", "dataset/grit.py"]
CORE = ["tests/test_oracles.py", "tests/test_models.py"]
MODEL_TESTS = CORE + ["tests/test_ecm.py", "tests/test_hitc.py", "tests/test_hard_negatives.py", "tests/test_savings.py",
                      "tests/test_concepts.py"]
TESTS = {"dataset/grit.py": ["tests/test_oracles.py", "tests/test_grit.py", "tests/test_ecm_notebook.py"],
         "models/objectives/ecm.py": CORE + ["tests/test_ecm.py"],
         "models/model_vqa.py": CORE + ["tests/test_vqa.py"],
         "models/model_nlvr.py": CORE + ["tests/test_classification.py"],
         "models/model_ve.py": CORE + ["tests/test_classification.py"],
         "models/objectives/hard_negatives.py": CORE + ["tests/test_hard_negatives.py"],
         "models/objectives/mim.py": CORE + ["tests/test_mim.py"]}

SWAPS = {"+": "-", "-": "+", "*": "/", "/": "*", "<": "<=", "<=": "<", ">": ">=", ">=": ">", "==": "!=",
         "!=": "==", "True": "False", "False": "True", "and": "or", "or": "and", "min": "max", "max": "min",
         "0": "1", "1": "0", "2": "3", "0.5": "1.0", "1.0": "0.5"}
SKIP_LINE = ("raise ", "print(", "assert ", "return f\"", "f\"", "\"", "'", "#", "@", "def ", "class ", "import ",
             "from ")

# reference implementations kept for the tests and benchmarks, not used in training
SKIP_FUNCTIONS = {"reference_walk"}

# mutants that change no observable behaviour (a reviewer's judgement, each with its reason): excluded from the
# score and listed apart. Keyed by (file, the line's text, old token, new token).
EQUIVALENT = {
    ("models/base.py", 'feat = F.normalize(proj(embeds[:, 0]).float(), dim=-1)', "-", "+"):
        "dim=+1 is dim=-1 on a 2-D tensor",
    ("models/objectives/hard_negatives.py", "pos = (v * t).sum(-1)                       # [B] cos(v_i, t_i), online-online",
     "-", "+"): "sum(+1) is sum(-1) on a 2-D tensor",
    ("models/base.py", 'if getattr(self, "use_concepts", False):', "False", "True"):
        "every model sets use_concepts: the default is never read",
    ("models/objectives/ecm.py", "k = min(2, sim.shape[1])", "2", "3"): "a third candidate is computed and never read",
    ("models/objectives/functional.py", "random_words = (torch.randint_like(input_ids, 0, vocab_size) if generator is None else",
     "0", "1"): "random MLM words drawn from [1, V) instead of [0, V): one id of 30,522 never drawn",
    ("dataset/grit.py", "if n == 0 or batch < 2:", "0", "1"):
        "n is a multiple of batch >= 2: never 1; n = 0 gives the same NaNs by the other branch",
    ("dataset/grit.py", "g.manual_seed(self.seed * 1_000_003 + self.epoch * 10_007 + self.flushes)", "+", "-"):
        "another seed of the same stream: any seed is GRIT's behaviour",
    ("dataset/grit.py", "flat_all = np.concatenate(rank_orders) if rank_orders else np.zeros(0, dtype=np.int64)",
     "0", "1"): "rank_orders always holds one order per rank: the else branch never runs",
    ("dataset/grit.py", 'dim, batch_size, seed + rank, device, config["queue_precision"])', "+", "-"):
        "another per-rank seed: rank 0 is unchanged and ranks still differ",
    ("dataset/grit.py", "if len(lengths) == 1:", "1", "0"):
        "one rank then takes the padded gather, which returns the same order",
    ("models/objectives/functional.py", "torch.empty_like(input_ids).random_(0, vocab_size, generator=generator))", "0", "1"):
        "random MLM words drawn from [1, V) instead of [0, V): one id of 30,522 never drawn",
    ("models/objectives/ecm.py", "k = min(2, sim.shape[1])", "min", "max"): "more candidates computed; the first two are the same",
    ("models/objectives/hard_negatives.py",
     "logits = torch.cat([pos[:, None], tn.masked_fill(~mask, MASKED * temp)], 1) / temp", "*", "/"):
        "a masked logit of -1e4 / temp**2 instead of -1e4: exp() of either is 0",
    ("models/objectives/mim.py", "x = torch.cat([vit.cls_token.expand(x.shape[0], -1, -1), x], dim=1)", "-", "+"):
        ("expand(B, +1, -1) is expand(B, -1, -1) on a [1, 1, d] token", {52}),
    ("models/objectives/hard_negatives.py",
     "new = stats[0] / stats[1] - stats[2:2 + len(HN_TYPES)] / count.clamp(min=1)", "1", "0"):
        ("a type with no valid negative divides by 0, but torch.where keeps its old margin", {85}),
    ("models/objectives/mim.py", "masked = model.mask_token.expand(x.shape[0], n + 1 - x.shape[1], -1)", "1", "0"):
        ("n + 1 - batch mask tokens instead of n + 1 - kept: the gather by ids_restore never reads the extra ones",
         {65}),
    ("models/objectives/hitc.py", "v = F.normalize(model.vision_proj_hidden[level](vis[level][:, 0]).float(), dim=-1)", "-", "+"):
        "dim=+1 is dim=-1 on a 2-D tensor",
    ("models/objectives/hitc.py", "t = F.normalize(model.text_proj_hidden[level](txt[level][:, 0]).float(), dim=-1)", "-", "+"):
        "dim=+1 is dim=-1 on a 2-D tensor",
    ("models/objectives/functional.py", "if sim_m is None or (not torch.is_tensor(alpha) and alpha == 0):", "or", "and"):
        ("with sim_m given and alpha 0 the mix is 0 * softmax + 1 * hard: the same targets", {21}),
    ("dataset/grit.py", "missing = np.setdiff1d(np.asarray(epoch_order, dtype=np.int64), seen, assume_unique=False)",
     "False", "True"): "GRIT's epoch order is a permutation and seen is deduplicated: both inputs are unique",
    ("models/objectives/hard_negatives.py",
     'logits = torch.einsum("bd,bkd->bk", image_feat, hn_feat.view(b, -1, hn_feat.shape[-1]))', "-", "+"):
        ("shape[+1] is shape[-1] of the 2-D negatives", {94}),
    ("models/objectives/itc.py", "if consistency > 0:", ">", ">="): "at weight 0 the term is added times 0",
    ("models/objectives/mlm.py",
     "if model.distill and (torch.is_tensor(alpha) or alpha > 0):   # tensor alpha: no branch on its value", ">", ">="):
        "at alpha 0 the teacher runs and its term is mixed in times 0",
    ("models/objectives/hard_negatives.py", "if self.cmr_weight > 0:", ">", ">="):
        "at weight 0 the CMR loss is added times 0 (its margins are read by nothing else)",
}


def equivalent_reason(key, col):
    """The reason a surviving mutant is equivalent, or None; an entry may name the columns it covers."""
    reason = EQUIVALENT.get(key)
    if isinstance(reason, tuple):
        reason = reason[0] if col in reason[1] else None
    return reason

# the one-line bugs of the review in issue 32: (file, text, replacement)
NAMED = [
    ("models/objectives/functional.py", "    masked = bern(mlm_probability)", "    masked = bern(min(1.0, 2 * mlm_probability))"),
    ("dataset/grit.py", "            self.groups.append(idx[s:e][walk])", "            self.groups.append(idx[s:e])"),
    ("models/objectives/ecm.py", "s_itc_targets(bs, conn_i2t, ecm[\"n1\"], conn_t2i, ecm[\"m1\"]",
     "s_itc_targets(bs, conn_i2t, ecm[\"m1\"], conn_t2i, ecm[\"n1\"]"),
    ("models/objectives/functional.py", "        temp = temp.float()\n        loss_i2t", "        temp = temp.float() * 0 + 1\n        loss_i2t"),
    ("models/base.py", "            self._momentum_update()\n            s.image_embeds_m, s.image_feat_m = "
     "self.encode_image(s.image, momentum=True, concepts=s.concepts)\n            _, s.text_feat_m = "
     "self.encode_text(s.input_ids, s.attention_mask, momentum=True)",
     "            s.image_embeds_m, s.image_feat_m = self.encode_image(s.image, momentum=True, concepts=s.concepts)\n"
     "            _, s.text_feat_m = self.encode_text(s.input_ids, s.attention_mask, momentum=True)\n"
     "            self._momentum_update()"),
    ("models/model_vqa.py", "(weights * out.loss).sum() / image.shape[0]", "(weights * out.loss).sum() / a_ids.shape[0]"),
    ("models/base.py", "        self.temp.clamp_(0.001, 0.5)", "        pass"),
]


def code_lines(src):
    """Line numbers (1-based) of executable code inside functions, docstrings and messages excluded."""
    import ast
    tree = ast.parse(src)
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name not in SKIP_FUNCTIONS:
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
                body = body[1:]
            for stmt in body:
                for sub in ast.walk(stmt):
                    if isinstance(sub, (ast.Raise, ast.Assert)):
                        lines.difference_update(range(sub.lineno, sub.end_lineno + 1))
                        continue
                    if hasattr(sub, "lineno") and isinstance(sub, ast.stmt) and not isinstance(sub, (ast.Raise,
                                                                                                   ast.Assert)):
                        lines.update(range(sub.lineno, sub.end_lineno + 1))
    text = src.split("\n")
    return {n for n in lines if not text[n - 1].strip().startswith(SKIP_LINE)}


def mutants(path):
    """Every (line, column, old, new) token swap on the code lines of ``path``."""
    src = open(os.path.join(ROOT, path)).read()
    keep = code_lines(src)
    out = []
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.start[0] not in keep or tok.type not in (tokenize.OP, tokenize.NAME, tokenize.NUMBER):
            continue
        if tok.string in SWAPS:
            out.append((path, tok.start[0], tok.start[1], tok.string, SWAPS[tok.string]))
    return out


def apply(src, line, col, old, new):
    lines = src.split("\n")
    text = lines[line - 1]
    assert text[col:col + len(old)] == old
    lines[line - 1] = text[:col] + new + text[col + len(old):]
    return "\n".join(lines)


def worker_copy():
    """A copy of the repository to mutate: the working tree is never touched."""
    import tempfile
    d = tempfile.mkdtemp(prefix="mutate-")
    shutil.copytree(ROOT, os.path.join(d, "repo"), ignore=shutil.ignore_patterns(
        ".git", ".venv*", "data", "output", "__pycache__", ".pytest_cache", "*.pth"))
    return os.path.join(d, "repo")


def preload():
    """Import the heavy libraries once in the parent; each mutant's forked child imports only the project."""
    import numpy  # noqa: F401
    import PIL.Image  # noqa: F401
    import pytest  # noqa: F401
    import timm  # noqa: F401
    import torch
    import transformers  # noqa: F401
    torch.set_num_threads(1)


def start(repo, path, new_src):
    """Fork a child that writes the mutant into ``repo`` and runs the fast tests of ``path`` there."""
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        with open(os.path.join(repo, path), "w") as f:
            f.write(new_src)
        os.chdir(repo)
        sys.path.insert(0, repo)
        sys.path.insert(0, os.path.join(repo, "tests"))
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        import pytest
        code = int(pytest.main(["-x", "-q", "-m", "not slow", "-p", "no:cacheprovider", *TESTS.get(path, MODEL_TESTS)]))
    finally:
        os._exit(code)


def run_all(jobs, workers, timeout, report):
    """``jobs``: (label, path, mutated source); ``report(label, caught)`` for each, ``workers`` at a time."""
    repos = [worker_copy() for _ in range(workers)]
    originals = {}
    free, running, queue = list(repos), {}, list(jobs)
    try:
        while queue or running:
            while queue and free:
                label, path, src = queue.pop(0)
                repo = free.pop()
                originals.setdefault(path, open(os.path.join(ROOT, path)).read())
                running[start(repo, path, src)] = (label, path, repo, time.time())
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                for p, (label, path, repo, t0) in list(running.items()):
                    if time.time() - t0 > timeout:   # a hang counts as caught
                        os.kill(p, 9)
                time.sleep(0.05)
                continue
            label, path, repo, t0 = running.pop(pid)
            with open(os.path.join(repo, path), "w") as f:   # the copy back to the original
                f.write(originals[path])
            free.append(repo)
            report(label, not (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0))
    finally:
        for p in running:
            os.kill(p, 9)
        for repo in repos:
            shutil.rmtree(os.path.dirname(repo), ignore_errors=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--file", action="append", help="mutate only these files (default: TARGETS)")
    p.add_argument("--sample", type=int, default=150, help="mutants drawn at random (with --seed)")
    p.add_argument("--all", action="store_true", help="every mutant instead of a sample")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-named", action="store_true", help="skip the named bugs")
    p.add_argument("--timeout", type=int, default=300, help="seconds per test run (longer: caught, a hang)")
    p.add_argument("--workers", type=int, default=2, help="mutants tested at once, each in its own copy")
    p.add_argument("--rerun", help="an earlier run's output: test its survivors again (with --no-named)")
    a = p.parse_args(argv)
    files = a.file or TARGETS
    pool = [m for f in files for m in mutants(f)]
    chosen = pool if a.all else random.Random(a.seed).sample(pool, min(a.sample, len(pool)))
    if a.rerun:   # the survivors of an earlier run's output, against today's tests
        import re
        pat = re.compile(r"^SURVIVED (\S+?):(\d+):(\d+) '(.*?)' -> '(.*?)'")
        keys = {m.groups() for m in map(pat.match, open(a.rerun)) if m}
        chosen = [m for m in pool if (m[0], str(m[1]), str(m[2]), m[3], m[4]) in keys]
        if len(chosen) != len(keys):
            print(f"note: {len(keys) - len(chosen)} of the {len(keys)} survivors no longer match the source")
    print(f"{len(pool)} mutants in {len(files)} files; running {len(chosen)} on {a.workers} workers", flush=True)
    jobs = []
    for path, line, col, old, new in chosen:
        src = open(os.path.join(ROOT, path)).read()
        text = src.split("\n")[line - 1].strip()
        jobs.append(((False, f"{path}:{line}:{col} {old!r} -> {new!r}   {text[:90]}", ((path, text, old, new), col)),
                     path, apply(src, line, col, old, new)))
    if not a.no_named:
        for path, old, new in NAMED:
            if a.file and path not in a.file:
                continue
            src = open(os.path.join(ROOT, path)).read()
            if src.count(old) != 1:
                sys.exit(f"named bug not applicable (code moved?): {path}: {old[:60]!r}")
            jobs.append(((True, f"named {path}: {old.strip()[:70]!r}", None), path, src.replace(old, new)))
    results, named, equivalent, t0 = [], [], [], time.time()

    def report(label, caught):
        reason = None if caught or label[2] is None else equivalent_reason(*label[2])
        if reason:
            equivalent.append(label[1])
            print(f"equivalent {label[1]}   ({reason})", flush=True)
            return
        (named if label[0] else results).append(caught)
        print(f"{'caught  ' if caught else 'SURVIVED'} {label[1]}", flush=True)
    preload()
    run_all(jobs, a.workers, a.timeout, report)
    total = results + named
    print(f"\n{sum(total)} of {len(total)} mutants caught ({100 * sum(total) / max(len(total), 1):.1f}%): "
          f"{sum(results)} of {len(results)} sampled, {sum(named)} of {len(named)} named; "
          f"{len(equivalent)} equivalent mutants left out (listed above); {time.time() - t0:.0f} s")
    return 0 if all(named) else 1


if __name__ == "__main__":
    sys.exit(main())

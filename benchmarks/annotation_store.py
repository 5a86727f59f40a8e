"""Start-up time and resident memory per rank of the annotations: JSON lists against the Arrow store.

    python benchmarks/annotation_store.py --n 14000000 [--workers 4] [--dir /tmp/store_bench]

Builds a synthetic corpus of ``--n`` CC3M-like entries ({image, caption}) as one JSON list and as a store
(dataset/store.py), then, in a fresh process for each: the load time, the rank's resident memory, and the
private memory of ``--workers`` forked workers that each read every entry once (as a loader's workers
would over an epoch: reading a JSON entry touches its reference counts, so copy-on-write copies the page).
"""
import argparse
import json
import os
import random
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

WORDS = ("a man woman dog cat red blue green small large sitting standing on in the with of near park street "
         "table beach water tree car bus train plate food").split()


def build(n, path_json, path_store):
    rng = random.Random(0)
    with open(path_json, "w") as f:
        f.write("[")
        for i in range(n):
            cap = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14)))
            f.write(("," if i else "") + json.dumps({"image": f"{i // 10000:05d}/{i:09d}.jpg", "caption": cap}))
        f.write("]")
    from dataset.store import convert
    convert([path_json], path_store, batch_rows=500_000, log=lambda *_: None)


def private_mib():
    """This process's own memory: the pages it wrote or copied on write (``Private_Dirty``). File pages it
    only read (the store's mapping) are page cache, one copy per machine for every process mapping the file;
    with workers forked one at a time they would show as ``Private_Clean`` only because no other process maps
    them at that moment, so they are reported apart (``mapped_clean_mib``)."""
    out = {"Private_Dirty:": 0, "Private_Clean:": 0}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith(tuple(out)):
                out[line.split()[0]] += int(line.split()[1])
    return out["Private_Dirty:"] / 1024, out["Private_Clean:"] / 1024


def rss_mib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def measure(kind, path, workers):
    from dataset.store import ArrowAnnotations   # torch, the datasets and pyarrow: every rank imports them
    import pyarrow  # noqa: F401
    base = rss_mib()
    t0 = time.perf_counter()
    if kind == "json":
        with open(path) as f:
            ann = json.load(f)
    else:
        ann = ArrowAnnotations(path)
    start = time.perf_counter() - t0
    rank = rss_mib() - base
    out = []
    # one worker at a time: each one's private pages are its own, so they add up as for concurrent workers,
    # while the machine holds only one copy (14M JSON entries: ~4 GiB per worker)
    for w in range(workers):
        r, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:   # a loader worker: reads its share of the epoch's entries
            os.close(r)
            n, chars = len(ann), 0
            for i in range(w, n, workers):
                chars += len(ann[i]["caption"])
            dirty, clean = private_mib()
            os.write(wfd, json.dumps({"private_mib": dirty, "clean_mib": clean, "chars": chars}).encode())
            os._exit(0)
        os.close(wfd)
        data = b""
        while chunk := os.read(r, 65536):
            data += chunk
        os.waitpid(pid, 0)
        out.append(json.loads(data))
    return {"start_s": start, "rank_mib": rank, "worker_private_mib": [o["private_mib"] for o in out],
            "worker_clean_mib": [o["clean_mib"] for o in out],
            "entries": len(ann)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=14_000_000)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--dir", default="/tmp/store_bench")
    ap.add_argument("--measure", nargs=2, help=argparse.SUPPRESS)   # (kind, path): one measurement
    a = ap.parse_args()
    if a.measure:
        print(json.dumps(measure(a.measure[0], a.measure[1], a.workers)))
        return
    os.makedirs(a.dir, exist_ok=True)
    pj, ps = os.path.join(a.dir, f"corpus_{a.n}.json"), os.path.join(a.dir, f"corpus_{a.n}.arrow")
    if not (os.path.isfile(pj) and os.path.isfile(ps)):
        t0 = time.perf_counter()
        build(a.n, pj, ps)
        print(f"built {a.n:,} entries in {time.perf_counter() - t0:.0f} s: JSON {os.path.getsize(pj) / 2**20:.0f} MiB, "
              f"store {os.path.getsize(ps) / 2**20:.0f} MiB")
    rows = {}
    for kind, path in (("json", pj), ("store", ps)):
        r = subprocess.run([sys.executable, os.path.abspath(__file__), "--measure", kind, path, "--workers",
                            str(a.workers)], capture_output=True, text=True, check=True)
        rows[kind] = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"{a.n:,} entries, {a.workers} forked workers each reading its share of every entry")
    for kind, r in rows.items():
        per_rank = r["rank_mib"] + sum(r["worker_private_mib"])
        print(f"{kind:6s} start-up {r['start_s']:6.2f} s  rank +{r['rank_mib']:8.1f} MiB  workers' private "
              f"{sum(r['worker_private_mib']):8.1f} MiB  per rank {per_rank:8.1f} MiB  (file pages read by the "
              f"workers, page cache: {sum(r['worker_clean_mib']):.0f} MiB)")
    j = rows["json"]["rank_mib"] + sum(rows["json"]["worker_private_mib"])
    s = rows["store"]["rank_mib"] + sum(rows["store"]["worker_private_mib"])
    print(f"store against JSON: {j / max(s, 1e-9):.1f}x less memory per rank, "
          f"{rows['json']['start_s'] / max(rows['store']['start_s'], 1e-9):.0f}x faster start-up (imports excluded)")
    mapped = os.path.getsize(ps) / 2**20
    print(f"counting the whole store file ({mapped:.0f} MiB, in fact page cache shared by every rank and worker on "
          f"the machine) against each rank too: {j / (s + mapped):.1f}x less")


if __name__ == "__main__":
    main()

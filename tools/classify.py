"""Zero-shot classification of a folder of images with a trained model (ITC against prompted class names).

    python -m tools.classify --config C --checkpoint K --images DIR --classes cat,dog,bus [--out preds.csv]
    python -m tools.classify --config C --checkpoint K --images DIR --classes names.txt --labels

``--classes``: comma-separated names or a file with one per line. ``--labels``: DIR holds a folder per class
(named as the class); accuracy is printed beside chance. ``--rerank k`` re-scores each image's top k classes
with ITM. Unreadable images are skipped and listed.
"""
import argparse
import csv
import os
import sys


def class_names(spec):
    names = ([n.strip() for n in open(spec, encoding="utf-8").read().splitlines()] if os.path.isfile(spec)
             else [n.strip() for n in spec.split(",")])
    names = [n for n in names if n]
    if not names:
        raise ValueError(f"--classes {spec!r}: no class names")
    return names


def main(argv=None):
    from tasks.api import ImageError, load_model, model_arguments
    from tools.search import list_images
    p = model_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    p.add_argument("--images", required=True)
    p.add_argument("--classes", required=True)
    p.add_argument("--labels", action="store_true", help="the images sit in a folder per class: print accuracy")
    p.add_argument("--rerank", type=int, default=0)
    p.add_argument("--out", default=None, help="CSV of predictions (default: standard output)")
    p.add_argument("--batch_size", type=int, default=32)
    a = p.parse_args(argv)
    try:
        names = class_names(a.classes)
        files = list_images(a.images)
        if not files:
            raise ValueError(f"--images: no image files under {a.images!r}")
        model = load_model(a.config, a.checkpoint, a.device)
        classes = model.class_features(names)   # once, for every batch
        rows, skipped = [], []
        for s in range(0, len(files), a.batch_size):
            readable = files[s:s + a.batch_size]
            try:
                probs = model.classify(readable, names, rerank=a.rerank, classes=classes).cpu()
            except ImageError:   # an unreadable file in the batch: classify its images one by one
                readable, probs = [], []
                for f in files[s:s + a.batch_size]:
                    try:
                        probs.append(model.classify([f], names, rerank=a.rerank, classes=classes).cpu()[0])
                        readable.append(f)
                    except ImageError as e:
                        skipped.append(str(e))
            if readable:
                for f, pr in zip(readable, probs):
                    top = int(pr.argmax())
                    rows.append({"image": f, "prediction": names[top], "score": f"{float(pr[top]):.4f}",
                                 **{f"p_{n}": f"{float(v):.4f}" for n, v in zip(names, pr)}})
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    out = open(a.out, "w", newline="") if a.out else sys.stdout
    w = csv.DictWriter(out, fieldnames=list(rows[0]) if rows else ["image", "prediction", "score"])
    w.writeheader()
    w.writerows(rows)
    if a.out:
        out.close()
    for msg in skipped:
        print(f"skipped: {msg}", file=sys.stderr)
    if a.labels and rows:
        gold = [os.path.basename(os.path.dirname(r["image"])) for r in rows]
        right = sum(g == r["prediction"] for g, r in zip(gold, rows))
        print(f"accuracy {100.0 * right / len(rows):.2f} ({right} of {len(rows)}; chance {100.0 / len(names):.2f})",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

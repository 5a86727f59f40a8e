"""Reading webdataset shards without unpacking them: shard lists, member offsets, one ``os.pread`` per image.

Used by the annotation store's converter, by JSON entries that point into a shard (``x.tar#key.jpg``) and by
the streamed loader (``dataset/shards.py``).
"""
import json
import os
import re
import tarfile
from collections import OrderedDict

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
FIELDS = ("caption", "kwords", "hard_negatives", "hn_valid")   # what a sample's .json may carry for us
TAR_REF = re.compile(r"^(.+\.tar)#(.+)$")


def expand(spec):
    """Shard paths from a list, a ``::``-joined string (OpenCLIP), brace patterns (``{00000..00099}``) and
    globs (``shards/*.tar``, sorted; a pattern that matches nothing stays as it is, for the caller's error)."""
    import glob
    from braceexpand import braceexpand
    out = []
    for s in ([spec] if isinstance(spec, str) else spec):
        for part in str(s).split("::"):
            for path in braceexpand(part):
                hits = sorted(glob.glob(path)) if any(c in path for c in "*?[") and not os.path.exists(path) else []
                out += hits or [path]
    return out


def is_shards(files):
    return bool(files) and all(str(f).endswith(".tar") for f in expand(files))


def split_key(name):
    """webdataset's sample grouping: the key is the name up to the first dot of its last component."""
    from webdataset.tariterators import base_plus_ext
    return base_plus_ext(name)


def shard_sizes(paths):
    """Samples per shard from img2dataset's ``{shard}_stats.json`` (``successes``), or None if any lacks one."""
    sizes = []
    for p in paths:
        stats = p[:-len(".tar")] + "_stats.json"
        if not os.path.isfile(stats):
            return None
        with open(stats) as f:
            sizes.append(int(json.load(f)["successes"]))
    return sizes


# ------------------------------------------------------------------ indexed access
def list_members(path):
    """``[(name, offset, size)]`` of a shard's regular files, in order. A shard cut short (a killed download)
    keeps the members that are whole; the second value is the reason it stopped early, or None."""
    out, cut = [], None
    end = os.path.getsize(path)
    try:
        with tarfile.open(path, "r:") as tf:
            for m in tf:
                if m.isreg():
                    if m.offset_data + m.size > end:
                        cut = f"member {m.name!r} is cut short"
                        break
                    out.append((m.name, m.offset_data, m.size))
    except (tarfile.ReadError, EOFError, OSError) as e:
        cut = f"{type(e).__name__}: {e}"
    return out, cut


class _Files:
    """This process's open shards (an LRU of file descriptors) and their member lists (for refs without
    offsets). A forked worker starts its own: it never reads through its parent's descriptors."""

    def __init__(self, max_open=64):
        self.max_open, self.pid, self.fds, self.members = max_open, None, OrderedDict(), OrderedDict()

    def _check_pid(self):
        if self.pid != os.getpid():
            self.pid, self.fds, self.members = os.getpid(), OrderedDict(), OrderedDict()

    def fd(self, path):
        self._check_pid()
        if path in self.fds:
            self.fds.move_to_end(path)
            return self.fds[path]
        fd = os.open(path, os.O_RDONLY)
        self.fds[path] = fd
        if len(self.fds) > self.max_open:
            os.close(self.fds.popitem(last=False)[1])
        return fd

    def member(self, path, name):
        self._check_pid()
        if path not in self.members:
            self.members[path] = {n: (o, s) for n, o, s in list_members(path)[0]}
            if len(self.members) > self.max_open:
                self.members.popitem(last=False)
        if name not in self.members[path]:
            raise FileNotFoundError(f"{path}: no member {name!r}")
        return self.members[path][name]


_FILES = _Files()


class TarMember(str):
    """An image inside a shard: the string is ``shard.tar#member`` (what errors and the bad-image count show);
    ``offset`` / ``size`` locate its bytes (None: looked up in the shard's member list)."""

    def __new__(cls, ref, offset=None, size=None):
        s = super().__new__(cls, ref)
        s.offset, s.size = offset, size
        return s

    def __reduce__(self):
        return TarMember, (str(self), self.offset, self.size)


def read_member(ref):
    """The bytes of ``shard.tar#member`` (a ``TarMember`` or a plain string)."""
    m = TAR_REF.match(ref)
    path, name = m.group(1), m.group(2)
    offset, size = getattr(ref, "offset", None), getattr(ref, "size", None)
    if offset is None:
        offset, size = _FILES.member(path, name)
    data = os.pread(_FILES.fd(path), size, offset)
    if len(data) != size:
        raise OSError(f"{ref}: {len(data)} of {size} bytes (the shard is cut short)")
    return data


def index_entries(path, log=print):
    """Store entries of one shard: the caption and fields of each sample (``.json``, else ``.txt``), the image
    as ``path#member`` with ``tar_offset`` / ``tar_size``, the path made absolute (``image_root`` does not
    apply to it; moved shards are converted again). A sample without an image or a caption is left out and
    counted; a cut shard keeps its whole samples."""
    path = os.path.abspath(path)
    members, cut = list_members(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        samples = OrderedDict()
        for name, off, size in members:
            key, ext = split_key(name)
            if key is not None:
                samples.setdefault(key, {})[ext.lower()] = (name, off, size)
        entries, skipped = [], 0
        for key, parts in samples.items():
            img = next((parts[e] for e in IMAGE_EXTS if e in parts), None)
            meta = {}
            if "json" in parts:
                _, off, size = parts["json"]
                meta = {k: v for k, v in json.loads(os.pread(fd, size, off)).items() if k in FIELDS}
            if "caption" not in meta and "txt" in parts:
                _, off, size = parts["txt"]
                meta["caption"] = os.pread(fd, size, off).decode("utf-8")
            if img is None or not isinstance(meta.get("caption"), (str, list)):
                skipped += 1
                continue
            entries.append({"image": f"{path}#{img[0]}", "caption": meta.pop("caption"), **meta,
                            "tar_offset": img[1], "tar_size": img[2]})
    finally:
        os.close(fd)
    if cut or skipped:
        log(f"{path}: {'cut short (' + cut + '), ' if cut else ''}{skipped} incomplete samples left out")
    return entries

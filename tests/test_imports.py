"""Imports only go down: launchers and tools -> tasks -> engine -> models, dataset -> schema, utils, optim,
scheduler; models and dataset never import each other; no import cycle among the project's modules (imports
inside functions included)."""
import ast
import glob
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS = {"tasks": 1, "engine": 2, "models": 3, "dataset": 3, "optim": 3, "scheduler": 3, "schema": 4, "utils": 4}
PACKAGES = ("tasks", "engine", "models", "dataset", "optim", "scheduler")


def module_of(path):
    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    return rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


def project_modules():
    files = [f for p in PACKAGES for f in glob.glob(os.path.join(ROOT, p, "**", "*.py"), recursive=True)]
    files += [os.path.join(ROOT, f) for f in ("schema.py", "utils.py")]
    return {module_of(f): f for f in files}


def imports(path, mods):
    """Project modules imported by a file, anywhere in it."""
    out = set()
    for node in ast.walk(ast.parse(open(path).read())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # ``from pkg import sub`` loads the submodule; ``from pkg import name`` reads pkg/__init__
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in mods else node.module
                     for a in node.names]
        out.update(n for n in names if n in mods)
    return out


def graph():
    mods = project_modules()
    return {m: imports(f, mods) - {m} for m, f in mods.items()}


def layer(mod):
    return LAYERS[mod.split(".")[0]]


def test_no_upward_import_and_models_and_dataset_apart():
    bad = []
    for m, deps in graph().items():
        for d in deps:
            top_m, top_d = m.split(".")[0], d.split(".")[0]
            if layer(d) < layer(m) or (layer(d) == layer(m) and top_m != top_d):
                bad.append(f"{m} imports {d}")
    assert not bad, "\n".join(sorted(bad))


def test_no_import_cycle():
    g = graph()
    state, cycles = {}, []

    def visit(m, path):
        state[m] = "open"
        for d in sorted(g[m]):
            if state.get(d) == "open":
                cycles.append(" -> ".join(path[path.index(d):] + [d]) if d in path else f"{m} -> {d}")
            elif d not in state:
                visit(d, path + [d])
        state[m] = "done"
    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    assert not cycles, "\n".join(cycles)

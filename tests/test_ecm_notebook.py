"""Get_ECM_example: the mining function and the notebook, run headless on a tiny world with a tiny filter."""
import json
import os

import pytest
import torch

from conftest import ROOT, tiny_config
from models import MODELS


@pytest.fixture(scope="module")
def tiny_filter(tiny_world, tmp_path_factory):
    d = tmp_path_factory.mktemp("filter")
    cfg = tiny_config(use_momentum=False, distill=False, tokenizer=os.path.join(tiny_world, "vocab"))
    cfg["bert_config"]["vocab_size"] = 128
    with open(d / "filter.yaml", "w") as f:
        json.dump(cfg, f)
    torch.manual_seed(0)
    torch.save({"model": MODELS["retrieval"](cfg).state_dict()}, d / "filter.pth")
    return str(d / "filter.yaml"), str(d / "filter.pth")


def test_mining_counts_every_candidate_and_checks_ground_truth(tiny_world, tiny_filter):
    from Get_ECM_example import ground_truth, mine
    truth = ground_truth(os.path.join(tiny_world, "false_negatives.json"), "train")
    # thresholds around the random filter's scores so that every decision occurs
    wrt_img, wrt_txt, stats = mine(*tiny_filter, os.path.join(tiny_world, "retrieval_train.json"), tiny_world,
                                   batch_size=8, group_batches=2, low=0.0, high=0.0, truth=truth)
    assert stats["candidates"] == 2 * stats["batches"] * 8
    assert stats["connections"] == stats["candidates"]   # high 0: every hardest negative is connected
    assert stats["true_connections"] == stats["true_false_negative_candidates"] and stats["recall"] == 1.0
    at = {r["high_threshold"]: r for r in stats["sweep"]}
    assert at[0.0]["connections"] == stats["candidates"] and at[0.0]["recall"] == 1.0
    assert [r["connections"] for r in stats["sweep"]] == sorted((r["connections"] for r in stats["sweep"]), reverse=True)
    assert 0 < len(wrt_img) and 0 < len(wrt_txt)
    assert {"anchor_image", "original_caption", "connected_caption", "score"} <= set(wrt_img[0])
    _, _, none = mine(*tiny_filter, os.path.join(tiny_world, "retrieval_train.json"), tiny_world, batch_size=8,
                      low=1.0, high=1.0, truth=truth)
    assert none["connections"] == 0 and none["negatives"] == none["candidates"] and none["precision"] == 0


@pytest.mark.slow
def test_notebook_runs_headless(tiny_world, tiny_filter, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("ECM_FILTER_CONFIG", tiny_filter[0])
    monkeypatch.setenv("ECM_FILTER_CHECKPOINT", tiny_filter[1])
    monkeypatch.setenv("ECM_DATA", os.path.join(tiny_world, "retrieval_train.json"))
    monkeypatch.setenv("ECM_IMAGE_ROOT", tiny_world)
    monkeypatch.setenv("ECM_TRUTH", os.path.join(tiny_world, "false_negatives.json"))
    monkeypatch.setenv("ECM_MAX_ITEMS", "160")
    nb = nbformat.read(os.path.join(ROOT, "Get_ECM_example.ipynb"), as_version=4)
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": ROOT}}).execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert '"candidates"' in text


def test_threshold_sweep_by_hand():
    from Get_ECM_example import threshold_sweep
    rows = threshold_sweep([0.95, 0.85, 0.6, 0.3, 0.8], [True, False, True, False, True], [0.5, 0.8, 0.9])
    assert [(r["connections"], r["true_connections"]) for r in rows] == [(4, 3), (3, 2), (1, 1)]
    assert rows[1]["precision"] == pytest.approx(2 / 3) and rows[1]["recall"] == pytest.approx(2 / 3)
    assert rows[2]["precision"] == 1.0 and rows[2]["recall"] == pytest.approx(1 / 3)

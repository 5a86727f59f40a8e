"""The device check runs on a CPU, tiny, so it is never broken when a GPU session comes."""
import json
import os

import pytest


@pytest.mark.slow
def test_gpu_check_stages_run_tiny_on_cpu(tmp_path):
    from benchmarks.gpu_check import main
    assert main(["--out", str(tmp_path), "--device", "cpu", "--ecm_batches", "1", "--ecm_batch", "4"]) == 0
    results = json.load(open(os.path.join(tmp_path, "gpu_check.json")))
    assert set(results) == {"environment", "ecm_precision"} and all(r["ok"] for r in results.values())
    ecm = results["ecm_precision"]
    assert ecm["pairs"] == 8 and 0 <= ecm["share_differing"] <= 1   # 4 anchors x 2 directions
    assert "| ecm_precision | True |" in open(os.path.join(tmp_path, "gpu_check.md")).read()

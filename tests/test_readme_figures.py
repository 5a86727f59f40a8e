"""benchmarks/readme_figures.py: its steps name files that exist, cover the README's demo commands, and read
the selected epoch's rows."""
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import readme_figures as rf   # noqa: E402

# README demo commands that print no figure the README quotes
NO_FIGURE = {"tools/embedding_spread.py", "tools/grit_hardness.py"}


def script_of(cmd):
    return cmd[2] if cmd[1] == "-m" else cmd[1]


def test_steps_name_existing_scripts_and_configs(tmp_path):
    for name, cmd, _, _ in rf.steps(str(tmp_path), 42):
        s = script_of(cmd)
        path = s.replace(".", "/") + ".py" if cmd[1] == "-m" else s
        assert os.path.isfile(os.path.join(ROOT, path)) or os.path.isdir(os.path.join(ROOT, s.replace(".", "/"))), name
        for flag in ("--config", "--filter_config", "--albef_config"):
            if flag in cmd:
                assert os.path.isfile(os.path.join(ROOT, cmd[cmd.index(flag) + 1])), (name, flag)


def test_every_readme_demo_command_is_a_step(tmp_path):
    """Each `python <script> --config configs/demo/...` of the README is run by some step, same script and config."""
    text = open(os.path.join(ROOT, "README.md")).read()
    found = set(re.findall(r"python (?:-m )?([\w/.]+) (?:[\w]+ )?(?:--task \w+ )?--config (configs/demo/\w+\.yaml)", text))
    assert len(found) >= 12
    have = set()
    for _, cmd, _, _ in rf.steps(str(tmp_path), 42):
        if "--config" in cmd:
            s = script_of(cmd)
            have.add((s, cmd[cmd.index("--config") + 1]))
    missing = {(s, c) for s, c in found if s not in NO_FIGURE and (s, c) not in have}
    assert not missing, missing


def test_selected_rows_and_classification(tmp_path):
    rows = [{"split": "val", "epoch": 0, "accuracy": 60.0},
            {"split": "val", "epoch": 1, "accuracy": 70.0},
            {"split": "val", "epoch": 2, "accuracy": 65.0},
            {"split": "test", "epoch": 1, "accuracy": 68.5, "acc_False": 67.0, "acc_True": 70.0}]
    with open(tmp_path / "results.jsonl", "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    # the val row of the epoch the test row was selected at, not the last val row
    assert rf.classification(str(tmp_path), ("False", "True")) == \
        {"test": 68.5, "False": 67.0, "True": 70.0, "epoch": 1, "val": 70.0}
    assert rf.last_row(str(tmp_path), "val")["epoch"] == 2


def test_json_out_reads_the_last_printed_object():
    out = 'progress line\n{"a": 1}\nmore\n{\n "b": {\n  "c": 2\n }\n}\n'
    assert rf.json_out(out) == {"b": {"c": 2}}
    assert rf.base("pretrain_s1") == "pretrain" and rf.base("search_index") == "search_index"

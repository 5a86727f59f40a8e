"""SigLIP's sigmoid loss as ALBEF's ITC (itc_loss: sigmoid) against hand computations and two gloo ranks."""
import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_config, tiny_text
from models import MODELS
from models.batch import as_batch
from models.objectives import Step
from models.objectives.siglip import SigLIP

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def by_hand(V, T, scale, bias, positive):
    """-(1/|rows|) sum_ij log sigmoid(z_ij (scale cos_ij + bias)), z = +1 on positives, plain floats."""
    total = 0.0
    for i in range(len(V)):
        for j in range(len(T)):
            cos = sum(a * b for a, b in zip(V[i], T[j]))
            z = 1.0 if positive(i, j) else -1.0
            total += math.log(1.0 + math.exp(-z * (scale * cos + bias)))
    return total / len(V)


def feats(n=4, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [F.normalize(torch.randn(n, d, generator=g), dim=-1) for _ in range(2)]


def step(V, T, idx=None, extra=None):
    s = Step(batch={"idx": idx} if idx is not None else {}, alpha=0.0, input_ids=None, attention_mask=None,
             image=torch.zeros(len(V), 3, 2, 2), image_feat=V, text_feat=T)
    s.extra_positives = extra
    return s


def stub(scale=10.0, bias=-10.0):
    return SimpleNamespace(logit_scale=torch.tensor(math.log(scale)), logit_bias=torch.tensor(bias))


def test_the_loss_is_the_sum_over_every_pair_of_the_batch_by_hand():
    V, T = feats()
    got = SigLIP()(stub(), step(V, T))["loss_ita"].item()
    assert got == pytest.approx(by_hand(V.tolist(), T.tolist(), 10.0, -10.0, lambda i, j: i == j), rel=1e-5)
    got = SigLIP()(stub(3.0, 0.5), step(V, T))["loss_ita"].item()   # scale and bias both enter
    assert got == pytest.approx(by_hand(V.tolist(), T.tolist(), 3.0, 0.5, lambda i, j: i == j), rel=1e-5)


def test_same_image_captions_and_ecm_connections_are_positives():
    V, T = feats()
    idx = torch.tensor([7, 5, 7, 9])
    got = SigLIP("index")(stub(), step(V, T, idx=idx))["loss_ita"].item()
    ids = idx.tolist()
    assert got == pytest.approx(by_hand(V.tolist(), T.tolist(), 10.0, -10.0, lambda i, j: ids[i] == ids[j]),
                                rel=1e-5)
    extra = torch.eye(4, dtype=torch.bool)
    extra[1, 3] = True   # ECM found that image 1 matches text 3
    got = SigLIP()(stub(), step(V, T, extra=extra))["loss_ita"].item()
    assert got == pytest.approx(by_hand(V.tolist(), T.tolist(), 10.0, -10.0, lambda i, j: i == j or (i, j) == (1, 3)),
                                rel=1e-5)


def test_the_model_starts_at_t_log_10_b_minus_10_and_trains_every_parameter_but_temp():
    torch.manual_seed(0)
    m = MODELS["pretrain"](tiny_config(itc_loss="sigmoid", use_momentum=False, distill=False)).eval()
    assert m.logit_scale.item() == pytest.approx(math.log(10)) and m.logit_bias.item() == -10.0
    assert not m.temp.requires_grad   # the softmax temperature is unused: frozen, so DDP needs no unused-param search
    image, text = torch.randn(4, 3, 32, 32), tiny_text(4, pad_first=False)
    out = m(as_batch(image, text))
    with torch.no_grad():
        v = F.normalize(m.vision_proj(m.visual_encoder(image)[:, 0]), dim=-1)
        t = F.normalize(m.text_proj(m.text_bert(input_ids=text["input_ids"], attention_mask=text["attention_mask"],
                                                mode="text").last_hidden_state[:, 0]), dim=-1)
    assert out["loss_ita"].item() == pytest.approx(by_hand(v.tolist(), t.tolist(), 10.0, -10.0, lambda i, j: i == j),
                                                   rel=1e-5)
    sum(v for k, v in out.items() if k.startswith("loss")).backward()
    assert not [n for n, p in m.named_parameters() if p.requires_grad and p.grad is None]
    assert m.logit_bias.grad != 0 and m.logit_scale.grad != 0
    # with the momentum model and queue on, SigLIP still scores the online pairs and MLM keeps its teacher
    mm = MODELS["pretrain"](tiny_config(itc_loss="sigmoid"))
    assert torch.isfinite(sum(v for k, v in mm(as_batch(image, text), alpha=0.4).items() if k.startswith("loss")))


def test_softmax_columns_are_refused_with_the_sigmoid_loss():
    with pytest.raises(ValueError, match="hn_itc.*itc_loss: softmax"):
        MODELS["pretrain"](tiny_config(itc_loss="sigmoid", hn_itc=True))


TWO_RANKS = r'''
import json, os, sys, math
from types import SimpleNamespace
import torch, torch.distributed as dist
sys.path.insert(0, os.environ["ROOT"]); sys.path.insert(0, os.path.join(os.environ["ROOT"], "tests"))
from test_siglip import feats, step, stub
from models.objectives.siglip import SigLIP
dist.init_process_group("gloo")
r = dist.get_rank()
V, T = feats(n=4)
v, t = V[2 * r:2 * r + 2].clone().requires_grad_(), T[2 * r:2 * r + 2].clone().requires_grad_()
loss = SigLIP()(stub(), step(v, t))["loss_ita"]
loss.backward()
json.dump({"loss": loss.item(), "gv": v.grad.tolist(), "gt": t.grad.tolist()}, open(os.environ["OUT"] + f".{r}", "w"))
dist.destroy_process_group()
'''


@pytest.mark.slow
def test_two_ranks_see_every_pair_of_the_global_batch(tmp_path):
    """2 gloo ranks x 2 samples: the mean of the ranks' losses (DDP's average) is one process's loss over the 4
    samples, and every feature gets the gradient one process gives it (its rank's gradient / 2: DDP's mean)."""
    script = tmp_path / "s.py"
    script.write_text(TWO_RANKS)
    env = {**os.environ, "ROOT": ROOT, "OUT": str(tmp_path / "out"), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29541",
                        str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.load(open(tmp_path / f"out.{k}")) for k in range(2)]
    V, T = feats(n=4)
    assert (ranks[0]["loss"] + ranks[1]["loss"]) / 2 == pytest.approx(
        by_hand(V.tolist(), T.tolist(), 10.0, -10.0, lambda i, j: i == j), rel=1e-5)
    V, T = V.clone().requires_grad_(), T.clone().requires_grad_()
    SigLIP()(stub(), step(V, T))["loss_ita"].backward()
    for k in range(2):
        rows = slice(2 * k, 2 * k + 2)
        assert torch.allclose(torch.tensor(ranks[k]["gv"]) / 2, V.grad[rows], atol=1e-6)
        assert torch.allclose(torch.tensor(ranks[k]["gt"]) / 2, T.grad[rows], atol=1e-6)

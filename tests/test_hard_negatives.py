"""CE-CLIP's losses on ALBEF's ITC (models/hard_negatives.py) against hand computations."""
import copy
import math
import os

import pytest
import torch
import torch.nn.functional as F

from models.batch import as_batch
from conftest import tiny_config, tiny_text
from models.objectives.hard_negatives import HardNegativeLosses

CE = dict(hn_itc=True, cmr_weight=0.2, imc_weight=0.3)


def unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def feats(b=3, d=8):
    v, t, h = unit(b, d, seed=0), unit(b, d, seed=1), unit(4 * b, d, seed=2)
    valid = torch.tensor([[1, 0, 1, 1], [0, 0, 0, 0], [1, 1, 0, 1]], dtype=torch.bool)[:b]
    return v, t, h, valid


def test_cmr_and_imc_equal_the_hand_computation_and_the_margins_update():
    v, t, h, valid = feats()
    temp = torch.tensor(0.07)
    loss = HardNegativeLosses(dict(CE, cmr_upper_bound_cos=10.0))   # no clamp on the margins' values here
    loss.theta.copy_(torch.tensor([0.01, 0.02, 0.03, 0.04]))
    out = loss(v, t, h, valid, temp)
    hand_cmr, n, hand_imc = 0.0, 0, 0.0
    for i in range(3):
        pos = float(v[i] @ t[i])
        for j in range(4):
            if valid[i, j]:
                neg = float(v[i] @ h[4 * i + j])
                hand_cmr += max(0.0, ([0.01, 0.02, 0.03, 0.04][j] + neg - pos) / 0.07)
                n += 1
        # IMC: [v_i . t_i, t_i . h_k for every valid k] / temp, target 0
        row = [pos / 0.07] + [float(t[i] @ h[k]) / 0.07 for k in range(12) if valid.view(-1)[k]]
        hand_imc += -row[0] + math.log(sum(math.exp(x) for x in row))
    assert out["loss_cmr"].item() == pytest.approx(0.2 * hand_cmr / n, rel=1e-5)
    assert out["loss_imc"].item() == pytest.approx(0.3 * hand_imc / 3, rel=1e-5)
    # margins for the next step: mean_i cos(v_i, t_i) - mean over valid i of cos(v_i, h_ij), clamped at 0;
    # type 1 has one valid entry, every type is checked
    pos = (v * t).sum(1)
    for j in range(4):
        rows = [i for i in range(3) if valid[i, j]]
        want = float(pos.mean()) - sum(float(v[i] @ h[4 * i + j]) for i in rows) / len(rows)
        assert loss.theta[j].item() == pytest.approx(max(want, 0.0), abs=1e-6)
    assert (loss.theta > 0.1).any()   # the values are not all at a clamp


def test_empty_type_keeps_its_margin_max_and_fixed_thresholds():
    v, t, h, valid = feats()
    valid[:, 2] = False   # no valid object negative anywhere in the batch
    loss = HardNegativeLosses(dict(CE, cmr_upper_bound_cos=10.0))
    loss.theta.fill_(0.05)
    loss(v, t, h, valid, torch.tensor(0.07))
    assert loss.theta[2].item() == pytest.approx(0.05) and torch.isfinite(loss.theta).all()
    mx = HardNegativeLosses(dict(CE, cmr_threshold="max", cmr_upper_bound_cos=10.0))
    mx(v, t, h, valid, torch.tensor(0.07))
    gaps = (v * t).sum(1)[:, None] - torch.einsum("bd,bkd->bk", v, h.view(3, 4, -1))
    want = gaps.masked_fill(~valid, -1e9).amax(0).clamp(min=0) / 5
    assert torch.allclose(mx.theta[[0, 1, 3]], want[[0, 1, 3]].clamp(max=10.0), atol=1e-6)
    fixed = HardNegativeLosses(dict(CE, cmr_threshold="fixed", cmr_fixed_threshold=0.03))
    fixed(v, t, h, valid, torch.tensor(0.07))
    assert torch.equal(fixed.theta, torch.full((4,), 0.03))
    # the clamp: a huge gap stops at the upper bound
    clamp = HardNegativeLosses(dict(CE, cmr_upper_bound_cos=0.1))
    clamp(v, -h.view(3, 4, -1)[:, 0], h, torch.ones(3, 4, dtype=torch.bool), torch.tensor(0.07))
    assert (clamp.theta <= 0.1 + 1e-7).all()


def test_no_valid_negative_costs_nothing_and_gives_finite_losses():
    v, t, h, _ = feats()
    valid = torch.zeros(3, 4, dtype=torch.bool)
    loss = HardNegativeLosses(dict(CE))
    out = loss(v.requires_grad_(), t, h, valid, torch.tensor(0.07))
    assert out["loss_cmr"].item() == 0.0
    # IMC over [pos] alone: CE of one logit is 0
    assert out["loss_imc"].item() == pytest.approx(0.0, abs=1e-6)
    cols = loss.extra_i2t(v, h, valid, torch.tensor(0.07))
    assert cols.shape == (3, 12) and (cols == -1e4).all()


def test_itc_hn_columns_get_target_zero_and_invalid_ones_no_mass():
    """ALBEF's ITC with the columns appended: the same as a hand soft-target CE over [sims, hn / temp]."""
    from models.objectives.itc import with_columns
    from models.objectives.functional import soft_target_ce
    v, t, h, valid = feats()
    loss = HardNegativeLosses(dict(CE))
    cols = loss.extra_i2t(v, h, valid, torch.tensor(0.07))
    sims = v @ t.t() / 0.07
    targets = torch.eye(3)
    got = soft_target_ce(*with_columns(sims, targets, cols))
    hand = 0.0
    for i in range(3):
        row = [float(x) for x in sims[i]] + [float(v[i] @ h[k]) / 0.07 for k in range(12) if valid.view(-1)[k]]
        hand += -row[i] + math.log(sum(math.exp(x) for x in row))
    assert got.item() == pytest.approx(hand / 3, rel=1e-5)
    own = HardNegativeLosses(dict(CE, hn_scope="own")).extra_i2t(v, h, valid, torch.tensor(0.07))
    assert own.shape == (3, 4) and own[0, 0].item() == pytest.approx(float(v[0] @ h[0]) / 0.07, rel=1e-5)


def test_reset_each_epoch_resets_once_per_epoch_and_the_margins_are_saved():
    loss = HardNegativeLosses(dict(CE, cmr_reset_each_epoch=True))
    loss.on_epoch(0)
    loss.theta.fill_(0.07)
    loss.on_epoch(0)   # a resume into epoch 0: kept
    assert loss.theta[0].item() == pytest.approx(0.07)
    state = copy.deepcopy(loss.state_dict())
    fresh = HardNegativeLosses(dict(CE, cmr_reset_each_epoch=True))
    fresh.load_state_dict(state)
    assert torch.equal(fresh.theta, loss.theta) and int(fresh.epoch_seen) == 0
    fresh.on_epoch(1)
    assert fresh.theta.sum().item() == 0.0


def no_dropout(**kw):   # the negatives' text pass then draws no random numbers: both models mask the same
    cfg = tiny_config(**kw)
    cfg["bert_config"].update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return cfg


def hn_batch(b=4, seed=5):
    hn = tiny_text(4 * b, n=6, seed=seed, pad_first=False)
    valid = torch.ones(b, 4, dtype=torch.bool)
    valid[1] = False
    valid[2, 0] = False
    return hn["input_ids"], hn["attention_mask"], valid


@pytest.mark.parametrize("recipe", ["albef", "grit", "mafa", "vicha"])
def test_pretraining_model_trains_with_the_ce_losses(recipe):
    from models import MODELS
    extra = {"albef": {}, "grit": dict(use_momentum=False, distill=False, itc_consistency_weight=0.2),
             "mafa": dict(use_momentum=False, distill=False, itc_label_smoothing=0.5, smoothing_start_epoch=0),
             "vicha": dict(vision_depth=4, return_hidden_state=True, num_hidden_align=1, ita_hidden_weight=0.1,
                           kw_img_model=True, num_hidden_layers_kw=2, mae=True, mim_decoder_heads=4)}
    torch.manual_seed(0)
    model = MODELS["pretrain"](tiny_config(**CE, **extra[recipe]))
    if recipe == "mafa":
        from models.objectives.ecm import ConnectionDiscriminator
        filt = MODELS["retrieval"](tiny_config(use_momentum=False, distill=False))
        model.set_discriminator(ConnectionDiscriminator(filt, 0.0, 0.0))
    kw = {}
    if recipe == "vicha":
        c = tiny_text(4, n=5, seed=3)
        kw["concepts"] = (c["input_ids"], c["attention_mask"])
    out = model(as_batch(torch.randn(4, 3, 32, 32), tiny_text(4), hard_negatives=hn_batch(), **kw), alpha=torch.tensor(0.4))
    assert {"loss_cmr", "loss_imc", "loss_ita"} <= out.keys()
    sum(v for k, v in out.items() if k.startswith("loss")).backward()
    grad = model.text_encoder.bert.embeddings.word_embeddings.weight.grad
    assert grad is not None and torch.isfinite(grad).all()
    assert "hn.theta" in model.state_dict()
    with pytest.raises(ValueError, match="no hard negatives"):
        model(as_batch(torch.randn(4, 3, 32, 32), tiny_text(4), **kw), alpha=0.4)


def test_ce_columns_change_only_the_itc_loss_and_need_no_queue_entry():
    """With hn_itc alone, the ITM and MLM losses equal the plain model's, the queue receives only the
    positives, and loss_ita differs (the columns count)."""
    from models import MODELS
    torch.manual_seed(0)
    plain = MODELS["pretrain"](no_dropout())
    ce = MODELS["pretrain"](no_dropout(hn_itc=True))
    ce.load_state_dict(plain.state_dict(), strict=False)
    image, text = torch.randn(4, 3, 32, 32), tiny_text(4)
    outs = []
    for m, kw in ((plain, {}), (ce, {"hard_negatives": hn_batch()})):
        torch.manual_seed(1)
        outs.append(m(as_batch(image, text, **kw), alpha=0.4))
    assert torch.equal(plain.text_queue, ce.text_queue) and int(plain.queue_ptr) == int(ce.queue_ptr)
    for k in ("loss_itm", "loss_mlm"):
        assert torch.allclose(outs[0][k], outs[1][k]), k
    assert outs[1]["loss_ita"] > outs[0]["loss_ita"]


GATHER = r'''
import os, sys, json, torch
import torch.distributed as dist
import torch.nn.functional as F
sys.path.insert(0, os.environ["ROOT"]); sys.path.insert(0, os.path.join(os.environ["ROOT"], "tests"))
from test_hard_negatives import CE, global_batch
from models.objectives.hard_negatives import HardNegativeLosses
dist.init_process_group("gloo")
r = dist.get_rank()
V, T, H, VALID = global_batch()
sl = slice(2 * r, 2 * r + 2)
v, t = V[sl].clone(), T[sl].clone()
h = H[8 * r:8 * r + 8].clone().requires_grad_()
loss = HardNegativeLosses(dict(CE))
out = loss(v, t, h, VALID[sl], torch.tensor(0.07))
cols = loss.extra_i2t(v, h, VALID[sl], torch.tensor(0.07))
(out["loss_imc"] + 1e-3 * cols.clamp(min=-50).sum()).backward()
json.dump({"imc": out["loss_imc"].item(), "cols": cols.tolist(), "theta": loss.theta.tolist(),
           "gh": h.grad.tolist()}, open(os.environ["OUT"] + f".{r}", "w"))
dist.destroy_process_group()
'''


def global_batch():
    g = torch.Generator().manual_seed(0)
    V, T, H = [F.normalize(torch.randn(n, 8, generator=g), dim=-1) for n in (4, 4, 16)]
    return V, T, H, torch.rand(4, 4, generator=g) > 0.3


@pytest.mark.slow
def test_two_rank_gather_equals_one_process_over_the_gathered_batch(tmp_path):
    """gloo, 2 ranks x 2 samples: the ITC-hn columns, IMC (mean over ranks) and the margins equal one process
    over the 4 samples, and each rank's negatives get the gradient one process gives them (after DDP's mean
    over ranks)."""
    import json
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = tmp_path / "g.py"
    script.write_text(GATHER)
    env = {**os.environ, "ROOT": root, "OUT": str(tmp_path / "out"), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
                        str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.load(open(tmp_path / f"out.{k}")) for k in range(2)]
    V, T, H, VALID = global_batch()
    H = H.clone().requires_grad_()
    one = HardNegativeLosses(dict(CE))
    out = one(V, T, H, VALID, torch.tensor(0.07))
    cols = one.extra_i2t(V, H, VALID, torch.tensor(0.07))
    assert torch.allclose(torch.tensor(ranks[0]["cols"] + ranks[1]["cols"]), cols, atol=1e-5)
    assert (ranks[0]["imc"] + ranks[1]["imc"]) / 2 == pytest.approx(out["loss_imc"].item(), rel=1e-5)
    assert ranks[0]["theta"] == ranks[1]["theta"]
    assert torch.allclose(torch.tensor(ranks[0]["theta"]), one.theta, atol=1e-6)
    # the mean of the two ranks' objectives, in one process
    (out["loss_imc"] + 1e-3 * cols.clamp(min=-50).sum() / 2).backward()
    per_rank = torch.tensor(ranks[0]["gh"] + ranks[1]["gh"])
    assert torch.allclose(per_rank / 2, H.grad, atol=1e-6)


def test_open_clip_path_trains_a_step_with_the_ce_losses(tmp_path):
    from test_concepts import tiny_clip
    from models.clip_model import CLIPWithHardNegatives, build_open_clip
    model_cfg, ckpt = tiny_clip(tmp_path)
    cfg = dict(CE, clip_model="tiny-vc-clip", clip_model_config=model_cfg, clip_checkpoint=ckpt)
    clip, tok = build_open_clip(cfg)
    model = CLIPWithHardNegatives(cfg, clip)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    texts = ["a red circle", "a blue square", "two shapes", "a small cross"]
    negs = [f"not {t}" for t in texts for _ in range(4)]
    valid = torch.ones(4, 4, dtype=torch.bool)
    valid[0] = False
    images = torch.randn(4, 3, 32, 32)
    losses = []
    for _ in range(3):
        out = model({"image": images, "text": tok(texts), "hn_text": tok(negs), "hn_valid": valid})
        loss = sum(v for k, v in out.items() if k.startswith("loss"))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert {"loss_ita", "loss_cmr", "loss_imc"} <= out.keys() and losses[-1] < losses[0]
    assert model.hn.theta.abs().sum() > 0   # the margins moved
    from models.clip_model import clip_scores   # the compositional benchmarks' CLIP score: the cosine
    s = clip_scores(model, images[:2], [texts[:2], texts[2:]], tok, torch.device("cpu"))["cos"]
    with torch.no_grad():
        v = F.normalize(model.clip.encode_image(images[:1]), dim=-1)
        t = F.normalize(model.clip.encode_text(tok([texts[1]])), dim=-1)
    assert s.shape == (2, 2) and s[0, 1].item() == pytest.approx(float(v[0] @ t[0]), abs=1e-5)
    with pytest.raises(FileNotFoundError, match="clip_checkpoint"):
        build_open_clip(dict(cfg, clip_checkpoint=str(tmp_path / "none.bin")))


@pytest.mark.slow
def test_clip_finetune_launcher_runs_on_the_demo_negatives(tiny_world, tmp_path):
    import json
    import subprocess
    import sys
    from test_concepts import tiny_clip
    model_cfg, ckpt = tiny_clip(tmp_path)
    cfg = dict(CE, clip_model="tiny-vc-clip", clip_model_config=model_cfg, clip_checkpoint=ckpt,
               train_file=[os.path.join(tiny_world, "pretrain_hn.json")], image_root=tiny_world, image_res=32,
               batch_size=8, max_steps=3, num_workers=0, tensorboard=False, print_freq=1,
               optimizer={"opt": "adamW", "lr": 1e-4, "weight_decay": 0.1, "betas": [0.9, 0.98], "eps": 1e-6},
               schedular={"sched": "cosine", "lr": 1e-4, "epochs": 1, "min_lr": 0.0, "warmup_epochs": 0})
    path = tmp_path / "clip.yaml"
    path.write_text(json.dumps(cfg))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, os.path.join(root, "CLIP_finetune.py"), "--config", str(path), "--output_dir",
                        str(tmp_path / "out"), "--device", "cpu"], cwd=root, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    log = [json.loads(line) for line in open(tmp_path / "out" / "log.txt")]
    assert log[-1]["step"] == 3 and "train_loss_cmr" in log[-1] and "train_loss_imc" in log[-1]
    state = torch.load(tmp_path / "out" / log_ckpt(tmp_path / "out"), map_location="cpu", weights_only=True)
    assert "hn.theta" in state["model"]


def log_ckpt(out):
    return sorted(f for f in os.listdir(out) if f.startswith("checkpoint") and f.endswith(".pth"))[-1]

"""The exact compute savings (shared image K/V across a step's fusion passes, MLM heads at the masked positions)
give the plain path's losses and gradients in every objective combination."""
import copy

import pytest
import torch

from models.batch import as_batch
from conftest import tiny_config, tiny_text


def config(**kw):
    cfg = tiny_config(**kw)
    cfg["bert_config"].update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return cfg


GRIT = dict(use_momentum=False, distill=False, itc_consistency_weight=0.2, itm_negative_selection="argmax")
CASES = {
    "albef": ("pretrain", config()),
    "albef_released_axis": ("pretrain", config(mlm_distill_seq_axis_bug=True)),
    "grit": ("pretrain", config(**GRIT)),
    "mafa": ("pretrain", config(**{**GRIT, "itc_consistency_weight": 0.0}, itc_label_smoothing=0.5,
                                smoothing_start_epoch=0)),
    "vicha": ("pretrain", config(vision_depth=4, return_hidden_state=True, num_hidden_align=1, ita_hidden_weight=0.1,
                                 kw_img_model=True, num_hidden_layers_kw=2, mae=True, mim_decoder_heads=4)),
    "retrieval": ("retrieval", config()),
    "retrieval_grit": ("retrieval", config(use_momentum=False, distill=False)),
}


def run(model, kind, concepts, seed=0):
    torch.manual_seed(seed)
    image = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    text = tiny_text(4)
    kw = {"concepts": concepts} if concepts is not None else {}
    if kind == "retrieval":
        kw["idx"] = torch.tensor([0, 1, 1, 2])
    out = model(as_batch(image, text, **kw), alpha=0.4)
    losses = {k: v for k, v in out.items() if k.startswith("loss")}
    sum(losses.values()).backward()
    return {k: v.detach() for k, v in losses.items()}, {n: p.grad for n, p in model.named_parameters()
                                                         if p.grad is not None}


@pytest.mark.parametrize("case", sorted(CASES))
def test_savings_give_the_plain_paths_losses_and_gradients(case):
    from models import MODELS
    kind, cfg = CASES[case]
    torch.manual_seed(0)
    base = MODELS[kind](cfg)
    if case == "mafa":   # all candidates connected: MAFA's MLM batch grows by every pair
        from models.objectives.ecm import ConnectionDiscriminator
        filt = MODELS["retrieval"](config(use_momentum=False, distill=False))
        base.set_discriminator(ConnectionDiscriminator(filt, 0.0, 0.0))
    concepts = None
    if cfg.get("kw_img_model"):
        kw = tiny_text(4, n=5, seed=3)
        concepts = (kw["input_ids"], kw["attention_mask"])
    fast, plain = copy.deepcopy(base), copy.deepcopy(base)
    plain.exact_savings = False
    if case == "mafa":
        fast.set_discriminator(base.objectives[0].discriminator)
        plain.set_discriminator(base.objectives[0].discriminator)
    lf, gf = run(fast, kind, concepts)
    lp, gp = run(plain, kind, concepts)
    assert lf.keys() == lp.keys() and "loss_itm" in lf
    for k in lf:
        assert torch.allclose(lf[k], lp[k], atol=1e-6, rtol=1e-5), (k, lf[k], lp[k])
    assert gf.keys() == gp.keys()
    for n in gf:
        assert torch.allclose(gf[n], gp[n], atol=1e-6, rtol=1e-4), n


def test_shared_kv_projects_each_layer_once_per_step():
    """The ITM negatives and the MLM pass reuse the positives' keys and values: one key projection of the
    image tokens per fusion layer and step, against three passes without the saving."""
    from models import MODELS
    counts = {}
    for saving in (True, False):
        torch.manual_seed(0)
        m = MODELS["pretrain"](config())
        m.exact_savings = saving
        calls = []
        m.text_encoder.bert.encoder.layer[3].crossattention.self.key.register_forward_hook(
            lambda mod, args, out, calls=calls: calls.append(args[0].shape[0]))
        run(m, "pretrain", None)
        counts[saving] = calls
    assert counts[True] == [4] and counts[False] == [4, 8, 4]   # positives, negatives (2B rows), MLM


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["pretrain", "retrieval"])
def test_compiled_steps_equal_eager_and_the_alpha_ramp_recompiles_nothing(kind):
    """torch.compile (graphs captured by dynamo, run by a counting backend) gives eager's losses; alpha is a
    0-d tensor, so its ramp adds no graph. The frames are the step's pieces around the one listed graph break
    (the MLM's masked-position lookup, a data-dependent shape); the masked count recompiles once as it turns
    into a dynamic dimension."""
    from models import MODELS
    torch._dynamo.reset()   # no frames cached by an earlier test
    torch.manual_seed(0)
    eager = MODELS[kind](config(queue_size=32))
    model = copy.deepcopy(eager)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    compiled = torch.compile(model, backend=backend)
    # 8 x 12 tokens: some masked in every step (a count of 0 or 1 would be specialised by dynamo, which only a
    # toy batch ever sees)
    image = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    text = tiny_text(8, n=12)
    kw = {"idx": torch.tensor([0, 1, 1, 2, 3, 4, 5, 5])} if kind == "retrieval" else {}
    counts = []
    for step in range(6):
        alpha = torch.tensor(0.4 * step / 6)
        outs = []
        for m in (compiled, eager):
            torch.manual_seed(step)
            out = m(as_batch(image, text, **kw), alpha=alpha)
            sum(v for k, v in out.items() if k.startswith("loss")).backward()
            outs.append({k: v.detach() for k, v in out.items() if k.startswith("loss")})
        for k in outs[1]:
            assert torch.allclose(outs[0][k], outs[1][k], atol=1e-6), (step, k)
        counts.append(len(graphs))
    assert counts[-1] == counts[2], counts   # nothing new once the ramp is under way
    assert counts[-1] <= 2 * counts[0], counts   # at most one recompile per frame


@pytest.mark.slow
def test_pretrain_py_with_compile_logs_the_eager_losses(tiny_world, tmp_path):
    """The engine's compile path (alpha as a tensor, the model compiled after DDP wrapping) end to end."""
    import json
    import os
    from test_engine import pretrain_cmd, run, write_config
    config = write_config(tiny_world, str(tmp_path / "c.yaml"), max_steps=4, ckpt_every_steps=0, num_workers=0)
    logs = {}
    for name, extra in (("eager", []), ("compiled", ["compile=true", "compile_backend=eager"])):
        out = str(tmp_path / name)
        run(pretrain_cmd(config, out, "--opts", *extra) if extra else pretrain_cmd(config, out))
        logs[name] = [json.loads(line) for line in open(os.path.join(out, "log.txt"))][-1]
    for k in ("train_loss_mlm", "train_loss_ita", "train_loss_itm"):
        assert logs["compiled"][k] == pytest.approx(logs["eager"][k], rel=1e-5), k


@pytest.mark.slow
@pytest.mark.parametrize("case", ["albef", "mafa"])
def test_compiled_pretraining_breaks_its_graph_only_where_listed(case):
    """The listed breaks (README): the MLM's masked-position lookup, and MAFA's MLM batch, whose size is the
    number of connections found. Momentum EMA, the queue and the gathers trace."""
    from models import MODELS
    kind, cfg = CASES[case]
    torch.manual_seed(0)
    model = MODELS[kind](cfg)
    if case == "mafa":
        from models.objectives.ecm import ConnectionDiscriminator
        model.set_discriminator(ConnectionDiscriminator(MODELS["retrieval"](config(use_momentum=False,
                                                                                   distill=False)), 0.0, 0.0))
    torch._dynamo.reset()
    ex = torch._dynamo.explain(model)(as_batch(torch.randn(8, 3, 32, 32), tiny_text(8, n=12)), alpha=torch.tensor(0.4))
    lines = {r.user_stack[-1].line.strip() for r in ex.break_reasons}
    listed = {"positions = None if full else (labels != -100).nonzero(as_tuple=True)"}
    if case == "mafa":
        listed |= {'extra_txt = torch.cat([ecm["n1"][conn_i2t], rows[conn_t2i]])',
                   'extra_img = torch.cat([rows[conn_i2t], ecm["m1"][conn_t2i]])'}
    assert lines == listed, lines

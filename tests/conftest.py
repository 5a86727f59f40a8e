import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
torch.set_num_threads(2)

TINY_BERT = dict(vocab_size=120, hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                 fusion_layer=2, encoder_width=32, max_position_embeddings=40)


def tiny_config(**kw):
    cfg = dict(image_res=32, patch_size=8, vision_width=32, vision_depth=2, vision_heads=2, embed_dim=16, temp=0.07,
               queue_size=16, momentum=0.995, alpha=0.4, mlm_probability=0.15, bert_config=dict(TINY_BERT))
    cfg.update(kw)
    return cfg


@pytest.fixture
def cfg():
    return tiny_config()


def tiny_text(b=4, n=7, seed=0, pad_first=True):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(104, 120, (b, n), generator=g)
    ids[:, 0] = 101
    att = torch.ones_like(ids)
    if pad_first:
        ids[0, 5:] = 0
        att[0, 5:] = 0
    return {"input_ids": ids, "attention_mask": att}


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    from dataset.synthetic import build_world
    out = str(tmp_path_factory.mktemp("world"))
    build_world(out, seed=1, n_train=96, n_val=16, n_test=24, size=32)
    return out


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: launcher, multi-process and compile tests (pytest -m 'not slow' skips "
                            "them: the core in under 3 minutes)")


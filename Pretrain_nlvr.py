"""NLVR2 text-assignment pretraining (ALBEF's Pretrain_nlvr.py on the shared engine).

    python -m torch.distributed.run --nproc_per_node=8 Pretrain_nlvr.py --config configs/NLVR_pretrain.yaml \\
        --checkpoint ALBEF.pth --output_dir out/ta

One epoch on the pretraining corpus at 256 px: each caption is shown with two images and the 18-layer fusion
encoder says which one it describes (0 first, 1 second, 2 neither). The 12-layer pretraining checkpoint is
mapped as ALBEF does (fusion layer n -> layers 2n-6 and 2n-5); ``checkpoint_00.pth`` then starts NLVR.py.
"""
from dataset import create_dataset
from dataset.collate import text_collate
from engine.config import base_parser, parse_launcher
from engine.trainer import Trainer, launch
from tasks.finetune import build
from models.base import bert_config_from
from models.checkpoint import remap_nlvr_pretrain
from models.model_nlvr import nlvr_num_layers
from models.model_pretrain_nlvr import ALBEF
from schema import value


def main():
    parser = base_parser("ALBEF NLVR2 text-assignment pretraining", "./configs/NLVR_pretrain.yaml",
                         "output/NLVR_pretrain")
    args, config = parse_launcher(parser, task="pretrain_nlvr")
    bc = bert_config_from(config)
    env, tokenizer, model = build(args, config, ALBEF,
                                  remap=lambda sd: remap_nlvr_pretrain(sd, bc.fusion_layer, nlvr_num_layers(bc)))
    train = create_dataset("pretrain", config, seed=args.seed)
    collate = text_collate(tokenizer, max_length=value(config, "max_tokens", "pretrain_nlvr"), truncation=True,
                          vc_max_tokens=value(config, "vc_max_tokens"))

    Trainer(args, config, env, model, train, collate).fit(resume=args.resume)


if __name__ == "__main__":
    launch(main)

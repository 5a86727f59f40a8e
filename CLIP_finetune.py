"""CE-CLIP's setting: finetune an open_clip model with the hard-negative losses on the shared engine.

    torchrun --nproc_per_node=4 CLIP_finetune.py --config configs/CE_CLIP.yaml --output_dir out/ce_clip

The config names the open_clip model (``clip_model``, ``clip_checkpoint``: local weights) and the losses
(``hn_itc``, ``cmr_weight``, ``imc_weight``); the annotations carry ``hard_negatives`` / ``hn_valid``
(tools/hard_negatives.py). ``python -m tasks.compositional --clip`` scores the result.
"""
import torch

from dataset import create_dataset
from engine.config import base_parser, parse_launcher
from engine.trainer import Trainer, launch, setup
from models.clip_model import CLIPWithHardNegatives, build_open_clip


class ClipCollate:
    """Images, CLIP tokens of the captions and of the 4B negatives (sample-major), validity [B, 4]."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, batch):
        out = {"image": torch.stack([b["image"] for b in batch]), "text": self.tokenizer([b["caption"] for b in batch]),
               "idx": torch.tensor([b["idx"] for b in batch]), "bad": [p for b in batch for p in b["bad"]],
               "n": len(batch)}
        if "hard_negatives" in batch[0]:
            out["hn_text"] = self.tokenizer([c for b in batch for c in b["hard_negatives"]])
            out["hn_valid"] = torch.tensor([b["hn_valid"] for b in batch], dtype=torch.bool)
        return out


def main():
    parser = base_parser("CE-CLIP finetuning of an open_clip model", "./configs/CE_CLIP.yaml", "output/CE_CLIP")
    args, config = parse_launcher(parser, task="clip")
    env = setup(args)
    clip, tokenizer = build_open_clip(config)
    model = CLIPWithHardNegatives(config, clip)
    train = create_dataset("pretrain", config, seed=args.seed)

    Trainer(args, config, env, model, train, ClipCollate(tokenizer)).fit(resume=args.resume)


if __name__ == "__main__":
    launch(main)

"""Image-text retrieval: finetune and evaluate (ALBEF's Retrieval.py on the shared engine).

    python Retrieval.py --config configs/Retrieval_flickr.yaml --checkpoint ALBEF.pth --output_dir out/flickr
    python Retrieval.py --config configs/Retrieval_flickr.yaml --checkpoint mscoco.pth --evaluate

The checkpoint is selected on the validation split (``checkpoint_best.pth``); the test split is
evaluated once, with that checkpoint. Results go to ``output_dir/results.jsonl`` and ``results.md``.
"""
from dataset import create_dataset
from dataset.collate import text_collate
from engine.config import base_parser, parse_launcher
from engine.splits import check_split
from engine.trainer import launch
from models.checkpoint import strip_bert
from models.model_retrieval import ALBEF
from schema import value
from tasks.finetune import build, finetune
from tasks.retrieval import Results, evaluate_split


def main():
    parser = base_parser("ALBEF image-text retrieval", "./configs/Retrieval_flickr.yaml", "output/Retrieval")
    parser.add_argument("--evaluate", action="store_true", help="evaluate --checkpoint on val and test, no training")
    args, config = parse_launcher(parser, task="retrieval")
    # a pretraining checkpoint: text_encoder.bert.* -> text_encoder.*, pos_embed resized (no-op if finetuned)
    env, tokenizer, model = build(args, config, ALBEF, remap=strip_bert)
    val = create_dataset("re_val", config) if config.get("val_file") else None
    test = create_dataset("re_test", config) if config.get("test_file") else None
    val = val if val is not None and check_split(config, "val_file", "val", len(val)) else None
    test = test if test is not None and check_split(config, "test_file", "test", len(test)) else None
    results = Results(args.output_dir, env.main)

    splits = {s: d for s, d in (("val", val), ("test", test)) if d is not None}

    def evaluate(m, split, autocast, tag, **info):
        return results.add(split, evaluate_split(m, splits[split], tokenizer, config, env.device, autocast), **info)

    def train():
        # ALBEF: padding='longest' and no truncation (its max_length=30 without truncation cuts nothing)
        max_tokens = value(config, "max_tokens")
        return create_dataset("re_train", config, seed=args.seed), text_collate(
            tokenizer, max_length=max_tokens, truncation=max_tokens is not None,
            vc_max_tokens=value(config, "vc_max_tokens"))

    finetune(args, config, env, model, list(splits), evaluate, "r_mean", "retrieval", Results.COLUMNS, train)


if __name__ == "__main__":
    launch(main)

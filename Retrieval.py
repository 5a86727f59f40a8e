"""Image-text retrieval: finetune and evaluate (ALBEF's Retrieval.py on the shared engine).

    python Retrieval.py --config configs/Retrieval_flickr.yaml --checkpoint ALBEF.pth --output_dir out/flickr
    python Retrieval.py --config configs/Retrieval_flickr.yaml --checkpoint mscoco.pth --evaluate

The checkpoint is selected on the validation split (``checkpoint_best.pth``); the test split is
evaluated once, with that checkpoint. Results go to ``output_dir/results.jsonl`` and ``results.md``.
"""
from dataset import TextCollate, create_dataset
from dataset.caption_dataset import as_list
from engine.config import base_parser, parse_launcher
from engine.logger import final_summary
from engine.retrieval_eval import Results, evaluate_split
from engine.splits import check_split, selection_metric
from engine.trainer import Trainer, autocast_context, build, launch
from models.checkpoint import strip_bert
from models.model_retrieval import ALBEF
from schema import value


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

    def evaluate(m, split, dataset, autocast, **info):
        return results.add(split, evaluate_split(m, dataset, tokenizer, config, env.device, autocast), **info)

    if args.evaluate:
        autocast, _ = autocast_context(value(config, "precision"), env.device)
        model.to(env.device)
        for split, dataset in (("val", val), ("test", test)):
            if dataset is not None:
                evaluate(model, split, dataset, autocast, checkpoint=args.checkpoint or "(random init)")
        return

    train = create_dataset("re_train", config, seed=args.seed)
    # ALBEF: padding='longest', max_length=30 without truncation
    max_tokens = value(config, "max_tokens")
    collate = TextCollate(tokenizer, max_length=max_tokens or 30, truncation=max_tokens is not None,
                          vc_max_tokens=value(config, "vc_max_tokens"))

    trainer = Trainer(args, config, env, model, train, collate, batch_size_key="batch_size_train",
                      select_metric=selection_metric(config, "val_r_mean", val is not None))
    if val is not None:
        trainer.evaluate_fn = lambda m, epoch: {f"val_{k}": v for k, v in
                                                evaluate(m, "val", val, trainer.autocast, epoch=epoch).items()
                                                if k not in ("split", "epoch")}
    trainer.fit(resume=args.resume)
    if test is None:
        return final_summary("retrieval finetuning (no test split)", trainer.last_record, (), args.output_dir)
    info = trainer.load_best()
    row = evaluate(model, "test", test, trainer.autocast, **info)
    final_summary(f"retrieval, test split {', '.join(as_list(config['test_file']))}", row, Results.COLUMNS,
                  args.output_dir, info["checkpoint"])


if __name__ == "__main__":
    launch(main)

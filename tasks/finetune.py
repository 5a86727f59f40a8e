"""What every finetuning launcher shares: building the model from the config and a checkpoint, and the one
finetune sequence (``--evaluate`` alone; else train, evaluate val after the epochs and keep the best as
``checkpoint_best.pth``, then test once with the selected weights)."""
from engine import checkpointing as ckpt_io
from engine.logger import final_summary, note
from engine.splits import selection_metric
from engine.trainer import Trainer, autocast_context, setup
from schema import value


def build(args, config, model_cls, remap=None):
    """A launcher's start: distributed setup, tokenizer, model, and ``--checkpoint`` weights unless there is a
    run to resume (``--checkpoint X --resume latest`` on an empty output dir initialises from X)."""
    from models.checkpoint import load_checkpoint
    from models.tokenization import ALBEFTokenizer
    env = setup(args)
    tokenizer = ALBEFTokenizer(config.get("tokenizer") or config.get("text_encoder") or "")
    model = model_cls(config, tokenizer)
    tokenizer.max_positions = model.bert_config.max_position_embeddings
    resuming = ckpt_io.resolve_resume(args.resume, args.output_dir) if getattr(args, "resume", "") else None
    if args.checkpoint and resuming is None:
        if args.resume:
            print(f"--resume {args.resume}: nothing to resume in {args.output_dir}; starting from --checkpoint "
                  f"{args.checkpoint}")
        report = load_checkpoint(model, args.checkpoint, remap=remap, verbose=False)
        if env.main:
            print(report.grouped() + f"\n  (every key: {args.output_dir}/run.log)")
            note(args.output_dir, report.summary(limit=100000), echo=False)
    return env, tokenizer, model


def finetune(args, config, env, model, splits, evaluate, metric, what, columns, train, prefix="val_"):
    """``splits``: the evaluation splits present (``val``, ``test``); ``evaluate(model, split, autocast, tag,
    **info)`` -> the row written for that split; ``metric``: the val row's key selected on (logged as
    ``prefix + metric``, as every val key); ``train()`` -> (dataset, collate), called only when training."""
    if args.evaluate:
        autocast, _ = autocast_context(value(config, "precision"), env.device)
        model.to(env.device)
        for split in splits:
            evaluate(model, split, autocast, "evaluate", checkpoint=args.checkpoint or "(random init)")
        return None
    dataset, collate = train()
    trainer = Trainer(args, config, env, model, dataset, collate, batch_size_key="batch_size_train",
                      select_metric=selection_metric(config, prefix + metric, "val" in splits))
    if "val" in splits:
        trainer.evaluate_fn = lambda m, epoch: {
            prefix + k: v for k, v in evaluate(m, "val", trainer.autocast, f"epoch{epoch}", epoch=epoch).items()
            if k not in ("split", "epoch")}
    trainer.fit(resume=args.resume)
    if "test" not in splits:
        return final_summary(f"{what} finetuning (no test split)", trainer.last_record, (), args.output_dir)
    info = trainer.load_best()
    row = evaluate(model, "test", trainer.autocast, "best", **info)
    final_summary(f"{what}, test split {test_files(config)}", row, columns, args.output_dir, info["checkpoint"])
    return row


def test_files(config):
    files = config["test_file"]
    return files if isinstance(files, str) else ", ".join(files)

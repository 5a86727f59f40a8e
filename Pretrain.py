"""ALBEF-family pretraining: ``python Pretrain.py --config configs/Pretrain.yaml --output_dir out/``.

Runs as one process, or under ``torchrun`` / ``python -m torch.distributed.launch --use_env``. GRIT-VLP's and
MAFA's own Pretrain.yaml work unchanged; MAFA's filter comes with MAFA's flags (``--filter_config``,
``--filter_checkpoint``, ``--low_threshold``, ``--high_threshold``) or the config's ``ecm`` group.
"""
from dataset import create_dataset
from dataset.collate import text_collate
from dataset.grit import Grit, GroupedSampler
from dataset.caption_dataset import as_list
from engine.config import base_parser, parse_launcher
from engine.logger import final_summary
from tasks.ecm_filter import build_discriminator
from tasks.retrieval import Results, evaluate_split
from engine.splits import check_split
from engine.trainer import Trainer, launch
from tasks.finetune import build
from models.model_pretrain import ALBEF
from schema import value


def zero_shot_eval(config, tokenizer, env, trainer, dataset):
    """Retrieval on ``test_file`` with the pretraining model's encoders (ALBEF's procedure)."""
    results = Results(trainer.output_dir, env.main)

    def run(model, epoch):
        metrics = evaluate_split(model, dataset, tokenizer, config, env.device, trainer.autocast)
        results.add("test (zero-shot)", metrics, epoch=epoch)
        return {f"test_{k}": v for k, v in metrics.items()}

    return run


def mafa_flags(args, config):
    """MAFA's command line: the filter and the thresholds go into the ``ecm`` group."""
    flags = {"filter_config": args.filter_config, "filter_checkpoint": args.filter_checkpoint,
             "low_threshold": args.low_threshold, "high_threshold": args.high_threshold}
    given = {k: v for k, v in flags.items() if v not in (None, "")}
    if given:
        config["ecm"] = {**(config.get("ecm") or {}), **given}


def grit_component(config, env, dataset, batch_size, seed):
    """GRIT-VLP's grouped sampling: the sampler it orders and the component that groups each epoch."""
    sampler = GroupedSampler(len(dataset), batch_size, env.world, env.rank, shuffle=True, seed=seed)
    grit = Grit({"collect_size": value(config, "grit.collect_size"), "search_space": value(config, "grit.search_space"),
                 "queue_precision": value(config, "grit.queue_precision")},
                sampler, int(value(config, "embed_dim")), batch_size, seed, env.rank, env.world, env.device,
                len(dataset))
    return sampler, grit


def main():
    parser = base_parser("ALBEF pretraining", "./configs/Pretrain.yaml", "output/Pretrain")
    parser.add_argument("--filter_config", default="", help="MAFA: the filter's retrieval config (ecm.filter_config)")
    parser.add_argument("--filter_checkpoint", default="", help="MAFA: the filter's weights (ecm.filter_checkpoint)")
    parser.add_argument("--low_threshold", type=float, default=None, help="MAFA: ecm.low_threshold (0.5)")
    parser.add_argument("--high_threshold", type=float, default=None, help="MAFA: ecm.high_threshold (0.8)")
    args, config = parse_launcher(parser, task="pretrain", adjust=mafa_flags)
    env, tokenizer, model = build(args, config, ALBEF)
    if config.get("ecm"):   # MAFA: false-negative mining with a frozen, finetuned filter
        model.set_discriminator(build_discriminator(config["ecm"], tokenizer, env.device))
    dataset = create_dataset("pretrain", config, seed=args.seed)
    collate = text_collate(tokenizer, max_length=value(config, "max_tokens", "pretrain"),
                          vc_max_tokens=value(config, "vc_max_tokens"))

    components, sampler = {}, None
    if config.get("grit"):
        sampler, components["grit"] = grit_component(config, env, dataset, int(value(config, "batch_size")),
                                                     args.seed)
    trainer = Trainer(args, config, env, model, dataset, collate, components=components, sampler=sampler)
    test = create_dataset("re_test", config) if config.get("test_file") else None
    if test is not None and check_split(config, "test_file", "test", len(test)):
        trainer.evaluate_fn = zero_shot_eval(config, tokenizer, env, trainer, test)
    record = trainer.fit(resume=args.resume)
    what = f"pretraining, {trainer.epochs} epochs"
    if trainer.evaluate_fn is not None:
        what += f"; zero-shot retrieval on {', '.join(as_list(config['test_file']))}"
    final_summary(what, {k[len("test_"):]: v for k, v in record.items() if k.startswith("test_")}, Results.COLUMNS,
                  args.output_dir, f"epoch {record['epoch']}" if "epoch" in record else None)


if __name__ == "__main__":
    launch(main)

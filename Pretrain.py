"""ALBEF-family pretraining: ``python Pretrain.py --config configs/Pretrain.yaml --output_dir out/``.

Runs as one process, or under ``torchrun`` / ``python -m torch.distributed.launch --use_env``.
"""
from dataset import TextCollate, batch_concepts, create_dataset
from engine.config import base_parser, parse_launcher
from engine.retrieval_eval import Results, evaluate_split
from engine.trainer import Trainer, build
from models.ecm import build_discriminator
from models.model_pretrain import ALBEF


def zero_shot_eval(config, tokenizer, env, trainer):
    """Retrieval on ``test_file`` with the pretraining model's encoders (ALBEF's procedure)."""
    dataset = create_dataset("re_test", config)
    results = Results(trainer.output_dir, env.main)

    def run(model, epoch):
        metrics = evaluate_split(model, dataset, tokenizer, config, env.device, trainer.autocast)
        results.add("test (zero-shot)", metrics, epoch=epoch)
        return {f"test_{k}": v for k, v in metrics.items()}

    return run


def main():
    parser = base_parser("ALBEF pretraining", "./configs/Pretrain.yaml", "output/Pretrain")
    args, config = parse_launcher(parser)
    env, tokenizer, model = build(args, config, ALBEF)
    if config.get("ecm"):   # MAFA: false-negative mining with a frozen, finetuned filter
        model.set_discriminator(build_discriminator(config["ecm"], tokenizer, env.device))
    dataset = create_dataset("pretrain", config, seed=args.seed)
    collate = TextCollate(tokenizer, max_length=config.get("max_tokens", 25),
                          vc_max_tokens=config.get("vc_max_tokens", 55))

    def step(model, batch, alpha):
        text = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        return model(batch["image"], text, alpha=alpha, idx=batch["idx"], concepts=batch_concepts(batch))

    trainer = Trainer(args, config, env, model, dataset, collate, step)
    if config.get("test_file"):
        trainer.evaluate_fn = zero_shot_eval(config, tokenizer, env, trainer)
    trainer.fit(resume=args.resume)


if __name__ == "__main__":
    main()

"""ALBEF-family pretraining: ``python Pretrain.py --config configs/Pretrain.yaml --output_dir out/``.

Runs as one process, or under ``torchrun`` / ``python -m torch.distributed.launch --use_env``.
"""
from dataset import TextCollate, create_dataset
from engine.config import base_parser, load_config, apply_overrides, validate
from engine.retrieval_eval import evaluation, itm_eval
from engine.trainer import Trainer, setup
from models.checkpoint import load_checkpoint
from models.model_pretrain import ALBEF
from models.tokenization import ALBEFTokenizer


def zero_shot_eval(config, tokenizer, env, trainer):
    """Retrieval on ``test_file`` with the pretraining model's encoders (ALBEF's procedure)."""
    dataset = create_dataset("re_test", config)

    def run(model, epoch):
        i2t, t2i, _, bad = evaluation(model, dataset, tokenizer, env.device, k_test=config.get("k_test", 256),
                                      max_length=config.get("eval_max_tokens", 30),
                                      batch_size=config.get("batch_size_test", 64),
                                      num_workers=config.get("num_workers", 2), autocast=trainer.autocast)
        metrics = itm_eval(i2t, t2i, dataset.txt2img, dataset.img2txt)
        print("zero-shot retrieval on", config["test_file"], {k: round(v, 2) for k, v in metrics.items()})
        return {f"test_{k}": v for k, v in metrics.items()} | ({"test_bad_images": len(bad)} if bad else {})

    return run


def main():
    parser = base_parser("ALBEF pretraining", "./configs/Pretrain.yaml", "output/Pretrain")
    parser.add_argument("--resume", default="", help="a checkpoint path, or 'latest' in output_dir")
    args = parser.parse_args()
    if str(args.resume).lower() in ("false", "0", "no", "none"):
        args.resume = ""
    config = apply_overrides(load_config(args.config), args.opts)
    if args.text_encoder:
        config["text_encoder"] = args.text_encoder
    validate(config)
    env = setup(args)
    tokenizer = ALBEFTokenizer(config.get("tokenizer") or config.get("text_encoder") or "")
    model = ALBEF(config, tokenizer)
    if args.checkpoint and not args.resume:
        load_checkpoint(model, args.checkpoint)
    dataset = create_dataset("pretrain", config, seed=args.seed)
    collate = TextCollate(tokenizer, max_length=config.get("max_tokens", 25))

    def step(model, batch, alpha):
        text = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        return model(batch["image"], text, alpha=alpha, idx=batch["idx"])

    trainer = Trainer(args, config, env, model, dataset, collate, step)
    if config.get("test_file"):
        trainer.evaluate_fn = zero_shot_eval(config, tokenizer, env, trainer)
    trainer.fit(resume=args.resume)


if __name__ == "__main__":
    main()

"""VQA: finetune the answer decoder and rank answers (ALBEF's VQA.py on the shared engine).

    python VQA.py --config configs/VQA.yaml --checkpoint ALBEF.pth --output_dir out/vqa
    python VQA.py --config configs/VQA.yaml --checkpoint out/vqa/checkpoint_07.pth --evaluate --output_dir out/vqa

A pretraining checkpoint is mapped as ALBEF does (the decoder takes the fusion layers and the MLM head); a
finetuned one (``vqa.pth``) loads as it is. After the last epoch (or with ``--evaluate``) every test question
is ranked over ``answer_list`` and ``output_dir/result/vqa_result_<epoch>.json`` holds the official result
file; where the test annotations hold answers, the official VQA accuracy is computed too.
"""
from dataset import create_dataset
from dataset.collate import vqa_collate
from dataset.caption_dataset import as_list
from engine.config import base_parser, parse_launcher
from engine.logger import final_summary
from engine.trainer import Trainer, autocast_context, launch
from tasks.finetune import build
from tasks.vqa import evaluator
from models.base import bert_config_from
from models.checkpoint import remap_vqa
from models.model_vqa import ALBEF
from schema import value


def main():
    parser = base_parser("ALBEF VQA", "./configs/VQA.yaml", "output/VQA")
    parser.add_argument("--text_decoder", default=None, help="local BERT directory for the answer decoder")
    parser.add_argument("--evaluate", action="store_true", help="rank the test questions with --checkpoint only")

    def flags(args, config):
        if args.text_decoder:
            config["text_decoder"] = args.text_decoder
    args, config = parse_launcher(parser, task="vqa", adjust=flags)
    fusion = bert_config_from(config).fusion_layer
    env, tokenizer, model = build(args, config, ALBEF, remap=lambda sd: remap_vqa(sd, fusion))
    autocast, _ = autocast_context(value(config, "precision"), env.device)
    evaluate = evaluator(config, tokenizer, env.device, args.output_dir, "test", autocast)
    if args.evaluate:
        model.to(env.device)
        if evaluate is not None:
            evaluate(model, "evaluate")
        return

    train = create_dataset("vqa_train", config, seed=args.seed)
    collate = vqa_collate(tokenizer, train=True, max_length=value(config, "max_tokens", "vqa"),
                         vc_max_tokens=value(config, "vc_max_tokens"))

    trainer = Trainer(args, config, env, model, train, collate, batch_size_key="batch_size_train",
                      evaluate_fn=evaluate and (lambda m, epoch: evaluate(m, f"epoch{epoch}")))   # ALBEF: last epoch
    record = trainer.fit(resume=args.resume)
    final_summary(f"VQA, test split {', '.join(as_list(config['test_file']))}",
                  {k[len("test_"):]: v for k, v in record.items() if k.startswith("test_")},
                  ("accuracy", "accuracy_yes/no", "accuracy_number", "accuracy_other"), args.output_dir,
                  f"epoch {record['epoch']}, the last" if "epoch" in record else None)


if __name__ == "__main__":
    launch(main)

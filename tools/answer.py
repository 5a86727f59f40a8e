"""Answer a question about one image with a VQA checkpoint, ranked over an answer list as ``VQA.py`` ranks.

    python -m tools.answer --config configs/VQA.yaml --checkpoint vqa.pth --image P --question "what color is the bus?" --answer_list answer_list.json
"""
import argparse
import json
import sys


def main(argv=None):
    from dataset.vqa_dataset import read_answer_list
    from tasks.api import load_model, model_arguments
    p = model_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    p.add_argument("--image", required=True)
    p.add_argument("--question", required=True)
    p.add_argument("--answer_list", default=None, help="default: the config's answer_list")
    a = p.parse_args(argv)
    try:
        model = load_model(a.config, a.checkpoint, a.device)
        answers = read_answer_list(a.answer_list or model.config.get("answer_list"))
        (answer, prob), = model.answer([a.image], [a.question], answers)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"question": a.question, "answer": answer, "probability": round(prob, 4)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""SNLI-VE: finetune and evaluate (ALBEF's VE.py on the shared engine).

    python VE.py --config configs/VE.yaml --checkpoint ALBEF.pth --output_dir out/ve
    python VE.py --config configs/VE.yaml --checkpoint out/ve/checkpoint_best.pth --evaluate

From a pretraining checkpoint (``text_encoder.bert.*`` renamed, as ALBEF) or a finetuned VE one. Accuracy on
the dev split selects ``checkpoint_best.pth``; the test split is evaluated once, with it.
"""
from tasks.classification import main
from engine.trainer import launch

if __name__ == "__main__":
    launch(lambda: main("ve", "ALBEF SNLI-VE", "./configs/VE.yaml", "output/VE"))

"""NLVR2: finetune and evaluate (ALBEF's NLVR.py on the shared engine).

    python Pretrain_nlvr.py --config configs/NLVR_pretrain.yaml --checkpoint ALBEF.pth --output_dir out/ta
    python NLVR.py --config configs/NLVR.yaml --checkpoint out/ta/checkpoint_00.pth --output_dir out/nlvr
    python NLVR.py --config configs/NLVR.yaml --checkpoint out/nlvr/checkpoint_best.pth --evaluate

The checkpoint is a text-assignment one (18 layers, loaded as it is; its missing momentum weights start as
copies of the loaded ones) or a pretraining one (ALBEF's layer duplication applied). Accuracy on the dev split
(``val_file``) every epoch selects ``checkpoint_best.pth``; the test split is evaluated once, with it.
"""
from tasks.classification import main
from engine.trainer import launch

if __name__ == "__main__":
    launch(lambda: main("nlvr", "ALBEF NLVR2", "./configs/NLVR.yaml", "output/NLVR"))

"""Weakly supervised RefCOCO+ grounding (ALBEF's Grounding.py on the shared engine).

    python Grounding.py --config configs/Grounding.yaml --checkpoint ALBEF.pth --output_dir out/grounding
    python Grounding.py --config configs/Grounding.yaml --checkpoint out/grounding/checkpoint_best.pth --evaluate

Trains the retrieval model with ITC + ITM on (image, expression) pairs, no boxes; after every epoch each test
expression is localised by Grad-CAM (``--gradcam_mode itm`` on text layer ``--block_num`` 8, the third
cross-attention layer, or ``itc`` on a ViT block) and the best detector proposal is scored against the gold
box. Accuracy per split (``val_d``, ``testA_d``, ``testB_d``) goes to ``results.jsonl`` / ``results.md``,
the checkpoint is selected on ``val_d``, and PNGs of the first expressions go to ``result/pictures_<tag>/``.
"""
from tasks.grounding import main
from engine.trainer import launch

if __name__ == "__main__":
    launch(main)

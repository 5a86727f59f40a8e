"""Use a trained model outside the launchers: features, ITM scores, VQA answers, Grad-CAM maps, zero-shot classes.

    from tasks.api import load_model
    m = load_model("configs/Retrieval_coco.yaml", "mscoco.pth")        # any checkpoint the launchers write
    img = m.encode_image(["a.jpg", "b.jpg"])                          # [2, 256], L2-normalised (ITC space)
    txt = m.encode_text(["a dog on a beach", "a red bus"])            # [2, 256]
    sims = img @ txt.T                                                 # cosine similarities
    m.itm_scores(["a.jpg"], ["a dog on a beach"])                     # ITM match logit of each pair
    m.classify(["a.jpg"], ["dog", "cat", "bus"])                      # [1, 3] probabilities
    heat = m.gradcam("a.jpg", "the dog on the left")                  # [grid, grid] map
    load_model("configs/VQA.yaml", "vqa.pth").answer(["a.jpg"], ["what is it?"], answers)

Every number is the one the launchers' evaluations compute on the same weights: features and ITM scores as
the retrieval evaluation (``tasks/retrieval.py``), answers as ``VQA.py --evaluate``, maps as ``Grounding.py``.
The model is built from the checkpoint's layout (pretraining, retrieval / grounding / MAFA filter, VQA), in
eval mode, with bf16 autocast on CUDA (ITC features and softmaxes in fp32).
"""
import contextlib
import hashlib
import os

import torch
import torch.nn.functional as F

from dataset.caption_dataset import load_image
from dataset.transforms import test_transform
from dataset.utils import pre_caption, pre_question
from engine.config import load_config, validate
from schema import value

# OpenCLIP's short ImageNet prompt set (its "simple" templates)
TEMPLATES = ("a photo of a {}.", "a bad photo of a {}.", "a photo of the large {}.", "a photo of the small {}.",
             "a drawing of a {}.", "a rendition of a {}.", "a photo of many {}.")


class ImageError(ValueError):
    """An image that cannot be read; the message names the file."""


def file_hash(path, chunk=1 << 22):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def load_model(config, checkpoint, device=None, checkpoint_dirs=()):
    """A ``VLModel`` from a config (path or dict) and a checkpoint (path, or a name of ``models.checkpoint``'s
    manifest found under ``checkpoint_dirs``); ``device`` defaults to CUDA when available."""
    from models import MODELS
    from models.checkpoint import (NEEDED, checkpoint_kind, extract_state_dict, find_released, load_file, load_into,
                                   remap_vqa, strip_bert)
    from models.tokenization import ALBEFTokenizer
    cfg = validate(dict(load_config(config)) if isinstance(config, str) else dict(config))
    if checkpoint and not os.path.isfile(checkpoint):
        checkpoint = find_released(checkpoint, checkpoint_dirs)
    sd = extract_state_dict(load_file(checkpoint, "checkpoint"))
    kind = checkpoint_kind(sd)
    # inference needs no momentum copies or queues
    cfg_model = dict(cfg, use_momentum=False, distill=False)
    tokenizer = ALBEFTokenizer(cfg.get("tokenizer") or cfg.get("text_encoder") or "")
    if kind in ("pretrain", "retrieval"):
        net, sd = MODELS["retrieval"](cfg_model, tokenizer), strip_bert(sd) if kind == "pretrain" else sd
        needed = NEEDED["retrieval"]
    elif kind == "vqa":
        from models.base import bert_config_from
        net = MODELS["vqa"](cfg_model, tokenizer)
        needed = NEEDED["vqa"]
    else:
        raise ValueError(f"checkpoint {checkpoint!r} is a {kind} checkpoint: evaluate it with "
                         f"{'NLVR.py' if kind in ('nlvr', 'pretrain_nlvr') else 'VE.py'} --evaluate")
    if kind == "vqa" and any(k.startswith("text_encoder.bert.") for k in sd):
        sd = remap_vqa(sd, bert_config_from(cfg).fusion_layer)
    report = load_into(net, sd, checkpoint, verbose=False)
    missing = [k for k in report.missing if k.startswith(needed) and "_m." not in k]
    if missing:
        raise ValueError(f"checkpoint {checkpoint!r} does not fit config {config if isinstance(config, str) else ''}: "
                         f"{len(missing)} weights the model needs are missing\n{report.summary()}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokenizer.max_positions = net.bert_config.max_position_embeddings
    return VLModel(net.to(device).eval(), tokenizer, cfg, device, kind, checkpoint)


class VLModel:
    """A loaded model with its tokenizer and test transform; every method is batched and takes images as
    paths or PIL images and texts as strings."""

    def __init__(self, model, tokenizer, config, device, kind, checkpoint=None):
        self.model, self.tokenizer, self.config, self.device, self.kind = model, tokenizer, config, device, kind
        self.checkpoint = checkpoint
        self.transform = test_transform(value(config, "image_res"))

    def autocast(self):
        if self.device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ---- inputs
    def images(self, images):
        """[N, 3, H, W] on the device; an unreadable image raises ``ImageError`` naming it."""
        out = []
        for im in images:
            if isinstance(im, str):
                try:
                    im = load_image(im)
                except Exception as e:   # noqa: BLE001 - any unreadable file: name it
                    raise ImageError(f"cannot read image {im!r}: {type(e).__name__}: {e}") from None
            out.append(self.transform(im.convert("RGB")))
        return torch.stack(out).to(self.device)

    def _need_itc(self):
        if self.kind == "vqa":
            raise ValueError("a VQA checkpoint has no ITC projections or ITM head: load a pretraining, retrieval "
                             "or grounding checkpoint for features, scores, maps and classes")
        if getattr(self.model, "use_concepts", False):
            raise ValueError("this model takes ViCHA's visual concepts per image (kw_img_model): the API does not "
                             "mine them; evaluate it with the launchers")

    # ---- ITC space
    @torch.no_grad()
    def encode_image(self, images, batch_size=32, states=False):
        """L2-normalised ITC features [N, embed_dim] (float32); with ``states`` also the token states."""
        self._need_itc()
        feats, hidden = [], []
        for s in range(0, len(images), batch_size):
            with self.autocast():
                h, f = self.model.encode_image(self.images(images[s:s + batch_size]))
            feats.append(f.float())
            if states:
                hidden.append(h)
        return (torch.cat(feats), torch.cat(hidden)) if states else torch.cat(feats)

    @torch.no_grad()
    def encode_text(self, texts, batch_size=256, states=False):
        """L2-normalised ITC features [N, embed_dim] of the captions, tokenized as the retrieval evaluation
        does (``pre_caption``, ``eval_max_tokens``); with ``states`` also (token states, masks)."""
        from tasks.retrieval import encode_texts
        self._need_itc()
        texts = [pre_caption(t, value(self.config, "max_words")) for t in texts]
        with self.autocast():
            atts, hidden, feats = encode_texts(self.model, self.tokenizer, texts, self.device,
                                               value(self.config, "eval_max_tokens"), batch_size)
        return (feats.float(), hidden, atts) if states else feats.float()

    @torch.no_grad()
    def itm_scores(self, images, texts, batch_size=32):
        """The ITM head's match logit of each (image i, text i) pair: ALBEF's re-ranking score. A repeated image
        (the same path or object) is read and encoded once, its keys and values shared by its pairs."""
        from models.xbert import SharedImageKV
        if len(images) != len(texts):
            raise ValueError(f"itm_scores pairs images with texts: {len(images)} images, {len(texts)} texts")
        out = []
        for s in range(0, len(images), batch_size):
            distinct, rows = distinct_images(images[s:s + batch_size])
            _, img = self.encode_image(distinct, states=True)
            _, txt, atts = self.encode_text(texts[s:s + batch_size], states=True)
            with self.autocast():
                rows = rows.to(self.device)
                out.append(self.model.itm_head(self.model.fuse(txt, atts, SharedImageKV(img)[rows]))[:, 1].float())
        return torch.cat(out)

    @torch.no_grad()
    def class_features(self, class_names, templates=TEMPLATES):
        """[C, embed_dim]: each class's prompts encoded, averaged and normalised (OpenCLIP's recipe)."""
        if not class_names:
            raise ValueError("classify needs at least one class name")
        per = [self.encode_text([t.format(c) for t in templates]) for c in class_names]
        return F.normalize(torch.stack([p.mean(0) for p in per]), dim=-1)

    @torch.no_grad()
    def classify(self, images, class_names, templates=TEMPLATES, rerank=0, classes=None):
        """Zero-shot class probabilities [N, C]: each class's text feature is the normalised mean of its
        prompts' (OpenCLIP's recipe), scored by ITC with the model's temperature; ``rerank`` k re-scores each
        image's top k classes by ITM on the first template (their probabilities renormalised among them)."""
        classes = self.class_features(class_names, templates) if classes is None else classes   # reusable
        feats = self.encode_image(images)
        probs = (feats @ classes.t() / self.model.temp.float()).softmax(-1)
        if rerank and len(images):
            k = min(int(rerank), len(class_names))
            top = probs.topk(k, dim=1).indices
            pairs = [(im, templates[0].format(class_names[c])) for im, row in zip(images, top.tolist()) for c in row]
            # one ITM pass over every image's k pairs; a batch holds whole images, each encoded once
            logits = self.itm_scores(*zip(*pairs), batch_size=k * max(1, 32 // k)).view(len(images), k)
            probs = torch.zeros_like(probs).scatter_(1, top, logits.softmax(-1))
        return probs

    # ---- grounding
    def gradcam(self, image, text, block_num=None, mode="itm", boxes=None):
        """Grad-CAM of ``text`` on ``image`` as ``Grounding.py`` computes it: a [grid, grid] map (ITM through
        text layer ``block_num``'s cross-attention, default the third fusion layer as ALBEF's 8 of 12, or
        ``mode='itc'`` through a ViT block); with ``boxes`` ([x, y, w, h] proposals) also the chosen box."""
        from tasks.grounding import grid_size, gradcam, pick_box
        self._need_itc()
        layers = len(self.model.text_bert.encoder.layer) if mode == "itm" else len(self.model.visual_encoder.blocks)
        first = self.model.bert_config.fusion_layer if mode == "itm" else 0
        if block_num is None:   # ALBEF's 8 of 12 (fusion from 6): the third fusion layer, or the last ViT block
            block_num = min(first + 2, layers - 1) if mode == "itm" else layers - 1
        if not first <= block_num < layers:
            raise ValueError(f"block_num {block_num}: {mode} Grad-CAM needs a layer in [{first}, {layers - 1}]")
        pil = load_image(image) if isinstance(image, str) else image
        ids = self.tokenizer([pre_caption(text, value(self.config, "max_words"))], padding="longest")
        with self.autocast():
            cam = gradcam(self.model, self.images([pil]), ids["input_ids"].to(self.device),
                          ids["attention_mask"].to(self.device), mode, block_num, grid_size(self.config))[0].cpu()
        if boxes is None:
            return cam
        return cam, pick_box(cam, boxes, pil.height, pil.width)[0]

    # ---- VQA
    @torch.no_grad()
    def answer(self, images, questions, answer_list, k=None, batch_size=16):
        """The best answer of ``answer_list`` for each (image, question) and its probability, ranked as
        ``VQA.py --evaluate`` does (``k_test`` candidates by first-token probability, re-ranked)."""
        from tasks.vqa import tokenize_answer_list
        if self.kind != "vqa":
            raise ValueError(f"answer needs a VQA checkpoint; {self.checkpoint!r} is a {self.kind} checkpoint")
        if len(images) != len(questions):
            raise ValueError(f"answer pairs images with questions: {len(images)} images, {len(questions)} questions")
        k = int(k or value(self.config, "k_test"))
        a_ids, a_mask = tokenize_answer_list(answer_list, self.tokenizer, value(self.config, "eos"), self.device)
        out = []
        for s in range(0, len(images), batch_size):
            q = self.tokenizer([pre_question(x, 50) for x in questions[s:s + batch_size]], padding="longest")
            distinct, rows = distinct_images(images[s:s + batch_size])
            with self.autocast():
                ids, probs = self.model.answer(self.images(distinct), q["input_ids"].to(self.device),
                                               q["attention_mask"].to(self.device), a_ids, a_mask, k,
                                               rows=rows.to(self.device))
            out += [(answer_list[i], float(p)) for i, p in zip(ids[:, 0].tolist(), probs[:, 0].tolist())]
        return out


def model_arguments(parser, required=True):
    """The ``--config`` / ``--checkpoint`` / ``--device`` options every command over a trained model takes."""
    parser.add_argument("--config", required=required, help="the model's YAML config")
    parser.add_argument("--checkpoint", required=required, help="a launcher's checkpoint or a released one")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    return parser


def distinct_images(images):
    """(each distinct image once, in first-seen order; the position of each input among them)."""
    first, distinct, rows = {}, [], []
    for im in images:
        key = im if isinstance(im, str) else id(im)
        if key not in first:
            first[key] = len(distinct)
            distinct.append(im)
        rows.append(first[key])
    return distinct, torch.tensor(rows, dtype=torch.long)


# ---- CLIP_benchmark
class ClipBenchmarkModel(torch.nn.Module):
    """``encode_image`` / ``encode_text`` over token ids, the interface clip_benchmark evaluates."""

    def __init__(self, vl):
        super().__init__()
        self.vl, self.model = vl, vl.model

    def encode_image(self, images):
        return self.model.encode_image(images.to(self.vl.device))[1]

    def encode_text(self, ids):
        ids = ids.to(self.vl.device)
        mask = (ids != self.vl.tokenizer.pad_token_id).long()
        mask[:, 0] = 1
        return self.model.encode_text(ids, mask)[1]


def clip_benchmark_triple(config, checkpoint, device=None):
    """(model, transform, tokenizer) for clip_benchmark (``tools/clip_benchmark.py`` registers it as the
    model type ``albef``); captions tokenized as the retrieval evaluation tokenizes them."""
    vl = load_model(config, checkpoint, device)
    vl._need_itc()
    n, words = value(vl.config, "eval_max_tokens"), value(vl.config, "max_words")

    def tokenizer(texts):
        texts = [texts] if isinstance(texts, str) else list(texts)
        return vl.tokenizer([pre_caption(t, words) for t in texts], padding="max_length", truncation=True,
                            max_length=n)["input_ids"]
    return ClipBenchmarkModel(vl).eval(), vl.transform, tokenizer

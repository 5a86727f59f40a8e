"""Text cleaning exactly as ALBEF (spec §0.2), and the drawing of ViCHA's visual concepts."""
import random
import re

_DROP = re.compile(r"[,.'!?\"()*#:;~]")


class AnnotationError(ValueError):
    """Bad annotations: the message names the config key, the file and the entry."""


def pre_caption(caption, max_words=30):
    caption = _DROP.sub("", caption.lower()).replace("-", " ").replace("/", " ").replace("<person>", "person")
    caption = re.sub(r"\s{2,}", " ", caption)
    caption = caption.rstrip("\n").strip(" ")
    words = caption.split(" ")
    if len(words) > max_words:
        caption = " ".join(words[:max_words])
    return caption


def pre_question(question, max_ques_words=30):
    question = _DROP.sub("", question.lower()).replace("-", " ").replace("/", " ")
    question = question.rstrip(" ")
    words = question.split(" ")
    if len(words) > max_ques_words:
        question = " ".join(words[:max_ques_words])
    return question


def sample_concepts(kwords, p=None, rng=None, replacement=False, sep_token=False):
    """One image's concept string. ``p`` None keeps all in their (similarity) order; otherwise
    ``int(p * len(kwords))`` are drawn in random order, with or without replacement (ViCHA: with)."""
    words = list(kwords)
    if p is not None and words:
        rng = rng or random
        n = int(p * len(words))
        words = rng.choices(words, k=n) if replacement else rng.sample(words, min(n, len(words)))
    return (" [SEP] " if sep_token else " ").join(words)


def load_spacy(model, error=RuntimeError):
    """A spaCy pipeline for POS tags only (NER and parser off), from a package name or a local directory;
    ``error`` (the caller's exception class) names what is missing. Nothing is downloaded."""
    try:
        import spacy
    except ImportError:
        raise error("spaCy is not installed: pip install spacy, then an English pipeline (en_core_web_sm) from "
                    "a local wheel or directory") from None
    try:
        return spacy.load(model, disable=["ner", "parser", "lemmatizer"])
    except OSError:
        raise error(f"spaCy pipeline {model!r} not found (a package name or a local directory; nothing is "
                    "downloaded)") from None

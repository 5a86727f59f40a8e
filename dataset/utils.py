"""Text cleaning exactly as ALBEF (spec §0.2)."""
import re

_DROP = re.compile(r"[,.'!?\"()*#:;~]")


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

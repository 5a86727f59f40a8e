import os

import pytest

from models.tokenization import ALBEFTokenizer


@pytest.fixture(scope="module")
def tok(tiny_world):
    return ALBEFTokenizer(os.path.join(tiny_world, "vocab"))


def test_words_are_in_vocabulary(tok):
    ids = tok("a large red circle at the top")["input_ids"][0].tolist()
    assert tok.unk_token_id not in ids
    assert tok.convert_ids_to_tokens(ids) == ["[CLS]", "a", "large", "red", "circle", "at", "the", "top"]


def test_single_sentence_has_no_trailing_sep_and_literal_sep_is_special(tok):
    ids = tok(["red circle at the top", "blue[SEP]"], padding="longest")["input_ids"]
    assert ids[0].tolist() == [tok.cls_token_id] + tok.tok.convert_tokens_to_ids(["red", "circle", "at", "the", "top"])
    assert ids[1].tolist() == [tok.cls_token_id, tok.tok.convert_tokens_to_ids("blue"), tok.sep_token_id] + [0] * 3


def test_truncation_keeps_cls_plus_l_minus_one_and_max_length_alone_does_not_truncate(tok):
    text = "a red circle and a blue square at the top"
    t = tok(text, truncation=True, max_length=5)
    assert t["input_ids"].shape == (1, 5) and t["input_ids"][0, 0] == tok.cls_token_id
    assert tok(text, max_length=5)["input_ids"].shape[1] == 11   # transformers 4.x semantics
    padded = tok(["red", text], padding="max_length", truncation=True, max_length=30)
    assert padded["input_ids"].shape == (2, 30)
    assert padded["attention_mask"][0].tolist() == [1, 1] + [0] * 28


def test_missing_vocab_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="vocab.txt"):
        ALBEFTokenizer(str(tmp_path))

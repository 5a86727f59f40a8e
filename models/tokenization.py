"""ALBEF's tokenizer behaviour on transformers' fast BERT tokenizer, from a local vocab only.

A single sentence encodes as ``[CLS] w1 .. wn`` with no trailing ``[SEP]``; a literal ``[SEP]`` in the text
is the special token (how VQA answers get their end token).
"""
import os
import sys

import torch
from transformers import BatchEncoding, BertTokenizerFast


class ALBEFTokenizer:
    def __init__(self, vocab_dir, do_lower_case=True):
        directory = vocab_dir if os.path.isdir(vocab_dir) else os.path.dirname(vocab_dir)
        if not os.path.isfile(os.path.join(directory, "vocab.txt")):
            raise FileNotFoundError(
                f"tokenizer: no vocab.txt at {vocab_dir!r} (config key 'tokenizer' or 'text_encoder', or "
                "--text_encoder); point it at a local BERT directory such as bert-base-uncased")
        # from_pretrained on a local folder behaves the same in transformers 4.x and 5.x (the constructor's
        # vocab argument was renamed, and the old name is silently ignored)
        self.tok = BertTokenizerFast.from_pretrained(directory, do_lower_case=do_lower_case, local_files_only=True)
        if self.tok.unk_token_id is None or len(self.tok) < 6:
            raise ValueError(f"tokenizer: {directory!r}/vocab.txt holds no usable vocabulary")
        self.cls_token_id = self.tok.cls_token_id
        self.sep_token_id = self.tok.sep_token_id
        self.pad_token_id = self.tok.pad_token_id
        self.mask_token_id = self.tok.mask_token_id
        self.unk_token_id = self.tok.unk_token_id
        self.vocab_dir = vocab_dir
        # the text encoder's positions (build() sets max_position_embeddings): no text is ever longer, truncation
        # asked for or not (ALBEF evaluates VQA and grounding untruncated, with 512 positions)
        self.max_positions = None
        self.texts_cut = 0   # in this process

    def __len__(self):
        return len(self.tok)

    def convert_ids_to_tokens(self, ids):
        return self.tok.convert_ids_to_tokens(ids)

    def decode(self, ids, **kw):
        return self.tok.decode(ids, **kw)

    def __call__(self, text, padding="longest", truncation=False, max_length=None, return_tensors="pt"):
        """ALBEF semantics: with ``truncation`` and ``max_length=L``, keep [CLS] + at most L-1 pieces.

        As in transformers 4.x, ``max_length`` without ``truncation`` does not truncate; with
        ``padding='max_length'`` shorter inputs are padded to ``max_length``.
        """
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        enc = self.tok(texts, add_special_tokens=False, truncation=False)["input_ids"]
        ids, cut, longest = [], 0, 0
        for pieces in enc:
            if truncation and max_length is not None:
                pieces = pieces[:max_length - 1]
            if self.max_positions is not None and len(pieces) >= self.max_positions:
                cut, longest = cut + 1, max(longest, len(pieces) + 1)
                pieces = pieces[:self.max_positions - 1]
            ids.append([self.cls_token_id] + pieces)
        if cut:
            if not self.texts_cut:
                print(f"warning: a text of {longest} tokens was cut to the text encoder's {self.max_positions} "
                      "positions (max_position_embeddings); evaluations count the texts cut", file=sys.stderr)
            self.texts_cut += cut
        if padding == "max_length" and max_length is not None:
            width = max(max_length, max(len(x) for x in ids))
        elif padding in ("longest", True):
            width = max(len(x) for x in ids)
        elif padding in (False, "do_not_pad"):
            width = None
        else:
            raise ValueError(f"padding must be 'longest', 'max_length' or False, got {padding!r}")
        if width is None:
            if return_tensors == "pt" and len({len(x) for x in ids}) > 1:
                raise ValueError("unpadded sequences of different lengths cannot be returned as tensors")
            masks = [[1] * len(x) for x in ids]
        else:
            masks = [[1] * len(x) + [0] * (width - len(x)) for x in ids]
            ids = [x + [self.pad_token_id] * (width - len(x)) for x in ids]
        data = {"input_ids": ids, "attention_mask": masks}
        if return_tensors == "pt":
            data = {k: torch.tensor(v, dtype=torch.long) for k, v in data.items()}
        out = BatchEncoding(data)
        out.texts_cut = cut
        return out

#!/usr/bin/env python3
"""Makes bench/tests/fixtures/data/ (run by hand): tiny files in the formats of the real assets, with
sentences written for the test (no third-party text), and a tiny WordPiece tokenizer.json built
like MiniLM's (BERT normaliser and pre-tokeniser, [CLS] … [SEP] template, padding fixed at 128,
truncation 128), plus the ids Python `tokenizers` gives for the fixture sentences
(`expected_ids.json`, no padding)."""
import json
import os

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

OUT = os.path.join(os.path.dirname(__file__), "..", "bench", "tests", "fixtures", "data")
SENTENCES = ["The phone is great.", "Battery died after two days!", "Great value, would buy again.",
             "Terrible screen and awful sound."]


def main():
    os.makedirs(os.path.join(OUT, "kotzias"), exist_ok=True)
    os.makedirs(os.path.join(OUT, "vader"), exist_ok=True)
    os.makedirs(os.path.join(OUT, "spam", "spam-1"), exist_ok=True)
    os.makedirs(os.path.join(OUT, "spam", "easy-ham-1"), exist_ok=True)
    rows = [{"text": s, "class": c} for s, c in zip(SENTENCES, [1, 0, 1, 0])] + [{"text": "", "class": None}]
    json.dump(rows, open(os.path.join(OUT, "kotzias", "amazon.json"), "w"))
    with open(os.path.join(OUT, "vader", "tweets_GroundTruth.txt"), "w") as f:
        f.write("1\t2.5\tThe phone is great.\n2\t-1.7\tBattery died after two days!\n3\t0.2\tIt is a phone.\n")
    msg = ("From someone@example.com  Mon Jan 1 00:00:00 2001\nSubject: Great value now\n"
           "Content-Type: text/html\n\n<html><body><p>Buy   two</p>\n<b>days</b> only</body></html>\n")
    json.dump({"id": "00001", "group": "spam-1", "text": msg}, open(os.path.join(OUT, "spam", "spam-1", "00001.a.json"), "w"))
    ham = "From a@example.com\nSubject: phone\n\nThe phone is great.\n"
    json.dump({"id": "00001", "group": "easy-ham-1", "text": ham}, open(os.path.join(OUT, "spam", "easy-ham-1", "00001.b.json"), "w"))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "the", "phone", "is", "great", ".", "battery", "died",
             "after", "two", "days", "!", "value", ",", "would", "buy", "again", "terrible", "screen", "and",
             "aw", "##ful", "sound", "it", "a"]
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    expected = [tok.encode(s).ids for s in SENTENCES]
    tok.enable_padding(length=128, pad_id=0, pad_token="[PAD]")
    tok.enable_truncation(128)
    tok.save(os.path.join(OUT, "tokenizer.json"))
    json.dump(expected, open(os.path.join(OUT, "expected_ids.json"), "w"))
    print(expected)


if __name__ == "__main__":
    main()

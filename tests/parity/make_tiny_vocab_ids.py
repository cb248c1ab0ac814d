"""Token ids that transformers' CLIPTokenizer gives on the vocabulary `tessera model synth`
writes (worker/src/model/tokenizer.rs, `write_tiny_vocab`), for awkward strings.

worker/tests/parity_text.rs writes that vocabulary, tokenizes the same strings with Tessera's
tokenizer and compares with tests/parity/fixtures/tiny_vocab_ids.json. Regenerate after any
change to `write_tiny_vocab`:

    cargo run --release -- model synth --arch sd21-tiny --out /tmp/tv
    v/bin/python tests/parity/make_tiny_vocab_ids.py /tmp/tv/tokenizer

(v: a venv with transformers, as in tests/parity/README.md). CI does not run this script.
"""

import json
import sys
from pathlib import Path

from transformers import CLIPTokenizer

TEXTS = [
    "a lighthouse",
    "  A  Lighthouse,   AT Dusk!! 3 boats & 2 gulls  ",
    "don't stop-believing: it's 1987's best!",
    "café crème brûlée, naïve façade",
    "東京の夜景 and 🌃 neon",
    "<|startoftext|> inside <|endoftext|> the text",
    "!!!",
    "tabs\tand\nnewlines",
    "" ,
    "word " * 120,
]


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: make_tiny_vocab_ids.py TOKENIZER_DIR")
    d = Path(sys.argv[1])
    tok = CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"), pad_token="!")
    cases = [
        {"text": t, "ids": tok(t, padding="max_length", max_length=77, truncation=True)["input_ids"]}
        for t in TEXTS
    ]
    out = Path(__file__).resolve().parent / "fixtures" / "tiny_vocab_ids.json"
    out.write_text(json.dumps({"pad_token": "!", "cases": cases}, ensure_ascii=False, indent=1) + "\n")
    print("wrote", out, len(cases), "cases")


if __name__ == "__main__":
    main()

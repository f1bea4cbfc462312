#!/usr/bin/env python3
"""Derive CLIP BPE tokenizer files (vocab.json, merges.txt) from CLIP's
``bpe_simple_vocab_16e6.txt.gz``.

Usage::

    python tools/make_tokenizer_assets.py /path/to/bpe_simple_vocab_16e6.txt.gz \
        [--out dreambooth/assets/tokenizer]

The layout matches the standard CLIP tokenizer files used by transformers'
``CLIPTokenizer``:

* ``vocab.json``: 49408 entries -- the 256 byte-level characters, the same 256
  characters with an ``</w>`` suffix, the 48894 BPE merges concatenated, then
  ``<|startoftext|>`` and ``<|endoftext|>``.
* ``merges.txt``: a ``#version: 0.2`` header followed by the 48894 merge rules
  (lines 1 .. 49152-256-2 of the BPE file, after its header line).

Besides those two files the tokenizer config, special tokens map and license
are written as well, so the output directory is a complete offline tokenizer.
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

NUM_MERGES = 49152 - 256 - 2  # 48894
BOS = "<|startoftext|>"
EOS = "<|endoftext|>"

LICENSE_TEXT = """\
The files vocab.json and merges.txt in this directory are derived from
bpe_simple_vocab_16e6.txt, the byte-pair-encoding vocabulary released with
OpenAI's CLIP (https://github.com/openai/CLIP), which is distributed under the
following license:

MIT License

Copyright (c) 2021 OpenAI

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
"""


def byte_unicode_table() -> list[str]:
    """The 256 printable characters standing for the bytes 0..255, in the
    canonical order: printable latin-1 bytes first (mapped to themselves),
    then the remaining bytes mapped to code points 256, 257, ..."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\u00a1"), ord("\u00ac") + 1))
        + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    )
    chars = [chr(b) for b in printable]
    extra = 0
    for b in range(256):
        if b not in printable:
            chars.append(chr(256 + extra))
            extra += 1
    assert len(chars) == 256 and len(set(chars)) == 256
    return chars


def read_merges(bpe_gz: Path) -> list[tuple[str, str]]:
    with gzip.open(bpe_gz, "rb") as fh:
        lines = fh.read().decode("utf-8").split("\n")
    # lines[0] is a header; the merge rules follow.
    rules = lines[1 : NUM_MERGES + 1]
    merges = []
    for line in rules:
        parts = line.split(" ")
        if len(parts) != 2:
            raise ValueError(f"malformed merge line: {line!r}")
        merges.append((parts[0], parts[1]))
    if len(merges) != NUM_MERGES:
        raise ValueError(f"expected {NUM_MERGES} merges, got {len(merges)}")
    return merges


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    tokens = byte_unicode_table()
    tokens = tokens + [t + "</w>" for t in tokens]
    tokens += ["".join(m) for m in merges]
    tokens += [BOS, EOS]
    vocab = {}
    for tok in tokens:
        if tok in vocab:
            raise ValueError(f"duplicate token {tok!r}")
        vocab[tok] = len(vocab)
    if len(vocab) != 49408:
        raise ValueError(f"expected 49408 tokens, got {len(vocab)}")
    return vocab


def tokenizer_config() -> dict:
    return {
        "add_prefix_space": False,
        "bos_token": BOS,
        "clean_up_tokenization_spaces": True,
        "do_lower_case": True,
        "eos_token": EOS,
        "errors": "replace",
        "model_max_length": 77,
        "pad_token": EOS,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": EOS,
    }


def special_tokens_map() -> dict:
    return {
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": EOS,
        "unk_token": EOS,
    }


def write_assets(bpe_gz: Path, out_dir: Path) -> None:
    merges = read_merges(bpe_gz)
    vocab = build_vocab(merges)
    out_dir.mkdir(parents=True, exist_ok=True)

    with open(out_dir / "vocab.json", "w", encoding="utf-8") as fh:
        json.dump(vocab, fh, ensure_ascii=False)
    with open(out_dir / "merges.txt", "w", encoding="utf-8", newline="\n") as fh:
        fh.write("#version: 0.2\n")
        for a, b in merges:
            fh.write(f"{a} {b}\n")
    for name, data in (
        ("tokenizer_config.json", tokenizer_config()),
        ("special_tokens_map.json", special_tokens_map()),
    ):
        with open(out_dir / name, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2, sort_keys=True)
            fh.write("\n")
    with open(out_dir / "LICENSE", "w", encoding="utf-8") as fh:
        fh.write(LICENSE_TEXT)


def main(argv: list[str] | None = None) -> None:
    default_out = Path(__file__).resolve().parent.parent / "dreambooth" / "assets" / "tokenizer"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bpe_gz", type=Path, help="path to bpe_simple_vocab_16e6.txt.gz")
    parser.add_argument("--out", type=Path, default=default_out, help="output directory")
    args = parser.parse_args(argv)
    write_assets(args.bpe_gz, args.out)
    print(f"wrote tokenizer assets to {args.out}")


if __name__ == "__main__":
    main()

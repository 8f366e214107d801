"""The SentencePiece tokenizer: BERT's special tokens at fixed ids, training on a bounded sample.

Special tokens and their ids (the contract every later stage relies on):

====== ==  ==================================================================
[PAD]  0   padding of the final tail sequence
[UNK]  1   unknown piece (rare: byte fallback spells unseen characters as bytes)
[CLS]  2   first token of every packed sequence
[SEP]  3   ends every document inside a packed sequence
[MASK] 4   the MLM mask token; a control symbol, so the text "[MASK]" never becomes it
====== ==  ==================================================================
"""

from __future__ import annotations

import hashlib
import io
import random
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import sentencepiece as spm

from data_prep.config import TokenizerConfig
from data_prep.errors import UserError

SPECIAL_TOKENS = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4}
PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = SPECIAL_TOKENS.values()


def special_ids() -> dict[str, int]:
    """The special ids as written in a manifest (``{"pad": 0, "unk": 1, ...}``)."""
    return {name.strip("[]").lower(): i for name, i in SPECIAL_TOKENS.items()}


def sample_lines(texts: Iterable[str], cfg: TokenizerConfig) -> list[str]:
    """A seeded reservoir sample of at most ``cfg.sample_lines`` non-empty lines from ``texts``."""
    rng = random.Random(cfg.seed)
    reservoir: list[str] = []
    seen = 0
    for text in texts:
        for line in text.split("\n"):
            line = line.strip()
            if not line:
                continue
            line = line[: cfg.max_line_chars]
            seen += 1
            if len(reservoir) < cfg.sample_lines:
                reservoir.append(line)
            else:
                j = rng.randrange(seen)
                if j < cfg.sample_lines:
                    reservoir[j] = line
    return reservoir


def train(lines: list[str], cfg: TokenizerConfig) -> bytes:
    """Train a SentencePiece model on ``lines``; returns the serialized model."""
    if not lines:
        raise UserError("tokenizer: the input holds no text to train on")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=model,
            model_type=cfg.type.value,
            vocab_size=cfg.vocab_size,
            character_coverage=cfg.character_coverage,
            byte_fallback=True,
            pad_id=SPECIAL_TOKENS["[PAD]"],
            pad_piece="[PAD]",
            unk_id=SPECIAL_TOKENS["[UNK]"],
            unk_piece="[UNK]",
            bos_id=SPECIAL_TOKENS["[CLS]"],
            bos_piece="[CLS]",
            eos_id=SPECIAL_TOKENS["[SEP]"],
            eos_piece="[SEP]",
            control_symbols=["[MASK]"],
            num_threads=cfg.threads,
            input_sentence_size=0,  # we already sampled
            minloglevel=2,
        )
    except RuntimeError as err:
        m = re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", str(err))
        if m:
            raise UserError(
                f"config key 'tokenizer.vocab_size' (--vocab-size): the input supports at most {m.group(2)} "
                f"pieces, not {m.group(1)}; pass a smaller --vocab-size or more text"
            ) from None
        m = re.search(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)", str(err))
        if m:
            raise UserError(
                f"config key 'tokenizer.vocab_size' (--vocab-size): {m.group(1)} is too small, the input's "
                f"characters and the byte and special pieces need more than {m.group(2)}; pass a larger "
                "--vocab-size or lower tokenizer.character_coverage"
            ) from None
        raise UserError(f"tokenizer training failed: {str(err).splitlines()[0]}") from None
    return model.getvalue()


def load(path: str | Path) -> spm.SentencePieceProcessor:
    """Load a SentencePiece model and check that its special tokens sit at the contract's ids."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: tokenizer model not found")
    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(str(path))
    except (OSError, RuntimeError) as err:
        raise UserError(f"{path}: not a SentencePiece model ({str(err).splitlines()[0]})") from None
    for piece, want in SPECIAL_TOKENS.items():
        got = sp.piece_to_id(piece)
        if got != want or sp.id_to_piece(want) != piece:
            raise UserError(
                f"{path}: special token {piece} has id {got}, expected {want}; train the "
                "tokenizer with bertforge prep, or one with the same special ids"
            )
    return sp


def sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def word_starts(sp: spm.SentencePieceProcessor) -> np.ndarray:
    """A bool per vocabulary id: the piece begins a word ("▁..." or a special token).

    Byte-fallback pieces count as continuations. Used by whole-word masking.
    """
    table = np.array([sp.id_to_piece(i).startswith("\u2581") for i in range(sp.vocab_size())])
    table[: len(SPECIAL_TOKENS)] = True
    return table

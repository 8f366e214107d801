"""The prep stage's typed configuration (``bertforge prep``; keys as in ``configs/prep/*.yaml``)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum

from data_prep.errors import UserError


class TokenizerType(Enum):
    """SentencePiece model families."""

    unigram = "unigram"
    bpe = "bpe"


@dataclass
class TokenizerConfig:
    """How the SentencePiece tokenizer is trained (or which one is reused)."""

    path: str | None = None
    """An existing SentencePiece ``.model`` to reuse instead of training one (``--tokenizer``).
    Its special tokens must sit at the ids in ``data_prep.tokenizer.SPECIAL_TOKENS``."""

    type: TokenizerType = TokenizerType.unigram
    """``unigram`` (the default, as in T5 and ALBERT) or ``bpe``."""

    vocab_size: int = 32768
    """Pieces in the vocabulary, special and byte-fallback pieces included (``--vocab-size``).
    32768 = 2^15: a multiple of 64 for GPU matrix shapes, and fits uint16 storage."""

    sample_lines: int = field(default=1_000_000, metadata={"range": "[1, inf)"})
    """Lines drawn (reservoir sampling, seeded) from the whole input to train on: bounds the
    trainer's memory and time whatever the corpus size."""

    sample_bytes: str = "2GB"
    """Input read for the sample, taken evenly from the start of every unit: bounds the sample
    pass's time on a corpus of any size (2 GB of text holds ~20M lines to draw from)."""

    max_line_chars: int = field(default=4096, metadata={"range": "[1, inf)"})
    """Sampled lines are cut to this length (SentencePiece's own per-sentence limit is 4192 bytes)."""

    character_coverage: float = field(default=0.9995, metadata={"range": "(0, 1]"})
    """Share of characters the vocabulary must cover; the rest go through byte fallback."""

    threads: int = field(default=4, metadata={"range": "[1, inf)"})
    """Trainer threads. Fixed rather than taken from the machine because the unigram trainer's
    result depends on it: the same config must give the same tokenizer everywhere."""

    seed: int = 0
    """Seed of the line sample."""


@dataclass
class PrepConfig:
    """``bertforge prep``: raw text to a tokenizer, packed WebDataset shards and a manifest."""

    input: list[str] = field(default_factory=list)
    """Files, folders (searched recursively), globs, or ``builtin:python-docs`` (``--input``)."""

    output: str = ""
    """The dataset folder to write (``--output``): manifest.json, tokenizer.model, train/, val/."""

    text_field: str = "text"
    """The JSON field that holds a document's text in ``.jsonl`` input (``--text-field``)."""

    seq_len: int = 128
    """Tokens per packed sequence, [CLS] included (``--seq-len``); BERT's phase-1 length."""

    val_fraction: float = 0.01
    """Share of documents routed to ``val/`` (chosen by a seeded draw per document)."""

    shard_size: str = "256MB"
    """Target bytes per tar shard (``--shard-size``); shards are closed once they reach it.
    256 MB is large enough for fast sequential reads, small enough to spread over many ranks."""

    block_size: str = "1MB"
    """Target bytes per tar member; a member holds many sequences, so tar headers cost <0.1%."""

    unit_size: str = "1GB"
    """Input bytes (as stored on disk) per work unit. Whole files are grouped, in sorted order,
    into units; a unit is the grain of resume (a finished unit is never redone) and of SLURM
    job arrays. Packing restarts at each unit, so each unit ends with one padded sequence."""

    read_size: str = "1MB"
    """Bytes read and handed to a tokenizer worker at a time, cut at a document boundary. A
    document longer than this is cut into pieces of at most this size (after whitespace),
    packed back to back with no [SEP] between them, so memory stays bounded."""

    max_line_bytes: str = "64MB"
    """A ``.jsonl`` line longer than this is skipped (and counted) without being held in memory."""

    workers: int = 0
    """Tokenizer processes (``--workers``); 0 means one per core. Output does not depend on it."""

    strict: bool = False
    """Turn any skipped document or file into an error (``--strict``); those ``dedup`` and ``min_chars``
    drop stay skips (the config asked for them)."""

    dedup: bool = False
    """Drop each document whose text is the same as an earlier one's (``--dedup``), in train/ and val/
    alike (a copy of a training document in val/ would flatter the eval), counted as skipped
    ``duplicate``. A pass over the input before the tokenizer's: a 64-bit hash per document, held
    in memory (about 50 bytes a document at the peak of the sort)."""

    dedup_against: list[str] = field(default_factory=list)
    """Dataset folders, each prepped with ``dedup`` (which keeps the hashes of its documents' text in
    its ``document_hashes.npy``), whose documents this prep drops too, counted as skipped ``duplicate``
    (``--dedup-against DIR ...``; needs ``dedup``): the datasets of a blend, prepped one after another,
    share no text (whatever their tokenizers)."""

    near_dup: float = 0.0
    """With ``dedup``, also drop each document whose word 5-grams overlap an earlier document's this
    much or more (Jaccard similarity: shared over all; ``--near-dup 0.8``; 0 drops none), counted as
    skipped ``near_duplicate``: the same text with another header, a fixed typo, a page mirrored.
    Estimated by MinHash in the same hash pass (:mod:`data_prep.neardup`): candidates by LSH bands,
    each pair checked on its signatures' marks; about 360 bytes a document more in memory at the
    peak at 0.8 (its 14 band keys and 128 marks, and their clusters). With ``dedup_against``, the
    near copies of those datasets' documents too (each prepped with this near_dup)."""

    min_chars: int = 0
    """Drop each document shorter than this many characters, whitespace stripped (a heading, a lone
    symbol: nothing to predict from), counted as skipped ``too_short``; 0 keeps every one. At most a
    quarter of ``read_size`` (a document read in several chunks is longer than that)."""

    seed: int = 0
    """Seed of the train/val draw."""

    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)

    def validate(self) -> None:
        """Refuse values that type checks cannot catch, naming the key."""
        if not self.input:
            raise UserError("prep: no input given (--input PATH [PATH ...] or input=[...])")
        if not self.output:
            raise UserError("prep: no output folder given (--output DIR or output=DIR)")
        if not 8 <= self.seq_len <= 1 << 20:
            raise UserError(f"config key 'seq_len': {self.seq_len} is outside [8, 1048576]")
        if not 0.0 <= self.val_fraction < 1.0:
            raise UserError(f"config key 'val_fraction': {self.val_fraction} is outside [0, 1)")
        for key in ("shard_size", "block_size", "unit_size", "read_size", "max_line_bytes"):
            parse_size(getattr(self, key), key)
        parse_size(self.tokenizer.sample_bytes, "tokenizer.sample_bytes")
        if parse_size(self.read_size) < 1024:
            raise UserError(f"config key 'read_size': '{self.read_size}' is below 1KB")
        if self.workers < 0:
            raise UserError(f"config key 'workers': {self.workers} is negative")
        if self.dedup_against and not self.dedup:
            raise UserError("config key 'dedup_against' needs dedup=true (--dedup): the same hash pass finds both")
        if not 0 <= self.near_dup < 1:
            raise UserError(
                f"config key 'near_dup': {self.near_dup} is outside [0, 1) (0.8: 80% of word 5-grams shared)"
            )
        if self.near_dup and not self.dedup:
            raise UserError("config key 'near_dup' needs dedup=true (--dedup): the same hash pass finds both")
        if not 0 <= self.min_chars <= parse_size(self.read_size) // 4:
            raise UserError(f"config key 'min_chars': {self.min_chars} is outside [0, read_size / 4]")
        tok = self.tokenizer
        if not 16 <= tok.vocab_size <= 1 << 31:
            raise UserError(f"config key 'tokenizer.vocab_size': {tok.vocab_size} is too small")
        if tok.sample_lines < 1 or tok.threads < 1 or tok.max_line_chars < 1:
            raise UserError(
                "config keys 'tokenizer.sample_lines', 'tokenizer.threads', 'tokenizer.max_line_chars' must be positive"
            )


_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(text: str, key: str = "size") -> int:
    """``'256MB'`` -> 256000000; names ``key`` when the text is not a size."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _UNITS:
        raise UserError(f"config key '{key}': '{text}' is not a size like 256MB, 64KiB or 1000000")
    value = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if value < 1:
        raise UserError(f"config key '{key}': '{text}' must be at least one byte")
    return value

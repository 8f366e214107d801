"""The tokenizer workers' side of prep: a chunk of raw input in, train and val token streams out.

Kept apart from the rest of prep so that what a worker needs is numpy, sentencepiece and the
corpus parser, never webdataset (which pulls in torch: seconds per process). The workers are
forked from prep's process on Linux (they inherit these modules) and spawned elsewhere (they
import them again).
"""

from __future__ import annotations

import itertools

import numpy as np
import sentencepiece as spm

from data_prep.corpus import Account, Chunk, ParseOptions, parse
from data_prep.tokenizer import SEP_ID

_sp: spm.SentencePieceProcessor | None = None
_dtype: np.dtype | None = None
_opts: ParseOptions | None = None


def init(model: bytes, dtype: str, opts: ParseOptions) -> None:
    """Load the tokenizer once per worker process."""
    global _sp, _dtype, _opts
    _sp = spm.SentencePieceProcessor(model_proto=model)
    _dtype, _opts = np.dtype(dtype), opts


def encode_chunk(chunk: Chunk) -> tuple[np.ndarray, np.ndarray, Account, int]:
    """Parse and tokenize one chunk into the train and val token streams.

    Each document is followed by [SEP] (a piece of a longer document is not). Returns the two
    streams, the chunk's input account, and its size in bytes (for the progress bar).
    """
    doc = parse(chunk, _opts)
    if not doc.texts:
        empty = np.empty(0, _dtype)
        return empty, empty, doc.account, chunk.nbytes
    # Lists of ints, flattened by numpy in one pass: sentencepiece's numpy return type wraps each
    # document's ids in a buffer object, which cost 40-60% on top of the encode itself.
    ids = _sp.encode(doc.texts, num_threads=1)  # one core per worker
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=_dtype, count=int(lengths.sum()))
    lasts = np.asarray(doc.lasts)
    # a [SEP] after each document's last piece, then each token routed to its document's split
    flat = np.insert(flat, np.cumsum(lengths)[lasts], SEP_ID)
    to_val = np.repeat(doc.vals, lengths + lasts)
    train, val = flat[~to_val], flat[to_val]
    return train, val, doc.account, chunk.nbytes

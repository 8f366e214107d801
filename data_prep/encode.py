"""The tokenizer workers' side of prep: a chunk of raw input in, train and val token streams out.

Kept apart from the rest of prep so that a worker process imports only numpy, sentencepiece
and the corpus parser (webdataset pulls in torch, which costs seconds per worker).
"""

from __future__ import annotations

import numpy as np
import sentencepiece as spm

from data_prep.corpus import Account, Chunk, ParseOptions, parse

SEP_ID = 3  # data_prep.tokenizer.SEP_ID (not imported: the tokenizer module pulls in more)

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
    pieces, account = parse(chunk, _opts)
    ids = _sp.encode([p.text for p in pieces], return_type="numpy", num_threads=1)  # one core per worker
    streams: tuple[list[np.ndarray], list[np.ndarray]] = ([], [])
    sep = np.array([SEP_ID], dtype=np.int32)
    for arr, piece in zip(ids, pieces):
        streams[piece.val].append(arr)
        if piece.last:
            streams[piece.val].append(sep)
    train, val = (np.concatenate(s).astype(_dtype) if s else np.empty(0, _dtype) for s in streams)
    size = len(chunk.data) if isinstance(chunk.data, bytes) else sum(len(t) for _, t in chunk.data)
    return train, val, account, size

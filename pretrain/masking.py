"""Dynamic masking for MLM: choose positions, then BERT's 80/10/10 replacement.

Pure numpy on a batch of packed sequences, driven by a ``numpy.random.Generator`` that the
caller seeds (per sample, so that a resumed run draws the same masks as an uninterrupted one).
Special tokens are never chosen. Whole-word masking chooses SentencePiece words (a piece that
starts with "▁" and the pieces after it) instead of single pieces.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from data_prep.tokenizer import MASK_ID, SPECIAL_TOKENS
from pretrain.model import IGNORE_INDEX

NUM_SPECIAL = len(SPECIAL_TOKENS)  # ids below this are special: never masked, never a random pick


@dataclass
class MaskingConfig:
    """How positions are chosen for the MLM loss and what replaces them."""

    probability: float = 0.15
    """Share of (non-special) tokens chosen for prediction (BERT: 15%; MosaicBERT used 30%)."""

    replace_mask: float = 0.8
    """Of the chosen tokens, the share replaced by [MASK] (BERT: 80%)."""

    replace_random: float = 0.1
    """Of the chosen tokens, the share replaced by a random token (BERT: 10%; the rest, 10%,
    stay as they are, so the model cannot learn that only [MASK] needs predicting)."""

    whole_word: bool = False
    """Choose whole SentencePiece words rather than single pieces."""

    def __post_init__(self) -> None:  # (its own checks: library code builds it directly)
        if not 0.0 < self.probability < 1.0:
            raise ValueError(f"masking.probability {self.probability} is outside (0, 1)")
        if self.replace_mask < 0 or self.replace_random < 0 or self.replace_mask + self.replace_random > 1:
            raise ValueError("masking.replace_mask + masking.replace_random must lie in [0, 1]")


def mask_batch(
    ids: np.ndarray,
    rng: np.random.Generator,
    cfg: MaskingConfig,
    vocab_size: int,
    word_start: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Mask a ``(batch, seq)`` array of token ids.

    Returns ``(inputs, labels)``: the ids with chosen positions replaced, and the original id at
    chosen positions (``IGNORE_INDEX`` elsewhere). ``word_start`` (a bool per vocabulary id, from
    :func:`data_prep.tokenizer.word_starts`) is needed for whole-word masking.
    """
    ids = np.asarray(ids, dtype=np.int64)
    maskable = ids >= NUM_SPECIAL
    draw = rng.random(ids.shape) < cfg.probability
    if cfg.whole_word:
        if word_start is None:
            raise ValueError("masking.whole_word needs the tokenizer's word-start table")
        starts = word_start[ids] | ~maskable  # a special token is a word of its own...
        starts[:, 1:] |= ~maskable[:, :-1]  # ...and the piece after it starts one
        pos = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
        first = np.maximum.accumulate(np.where(starts, pos, 0), axis=1)  # each token's word start
        draw = np.take_along_axis(draw, first, axis=1)  # the word's draw decides for all its pieces
    chosen = draw & maskable
    labels = np.where(chosen, ids, IGNORE_INDEX)
    how = rng.random(ids.shape)
    inputs = ids.copy()
    inputs[chosen & (how < cfg.replace_mask)] = MASK_ID
    randomised = chosen & (how >= cfg.replace_mask) & (how < cfg.replace_mask + cfg.replace_random)
    inputs[randomised] = rng.integers(NUM_SPECIAL, vocab_size, size=int(randomised.sum()))
    return inputs, labels

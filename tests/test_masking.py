"""Dynamic masking: rates, 80/10/10, special tokens untouched, seeded, whole words together."""

from __future__ import annotations

import numpy as np
import pytest
import sentencepiece as spm

from data_prep import tokenizer
from data_prep.tokenizer import CLS_ID, MASK_ID, PAD_ID, SEP_ID
from pretrain.masking import NUM_SPECIAL, MaskingConfig, mask_batch
from pretrain.model import IGNORE_INDEX


def batch(rows: int = 64, seq: int = 128, vocab: int = 1000, seed: int = 0) -> np.ndarray:
    ids = np.random.default_rng(seed).integers(NUM_SPECIAL, vocab, size=(rows, seq))
    ids[:, 0] = CLS_ID
    ids[:, 50] = SEP_ID
    ids[-1, 100:] = PAD_ID
    return ids


def test_rates_and_the_80_10_10_split() -> None:
    ids = batch(rows=256)
    inputs, labels = mask_batch(ids, np.random.default_rng(1), MaskingConfig(), vocab_size=1000)
    chosen = labels != IGNORE_INDEX
    maskable = ids >= NUM_SPECIAL
    assert abs(chosen.sum() / maskable.sum() - 0.15) < 0.01
    assert (labels[chosen] == ids[chosen]).all()
    as_mask = (inputs == MASK_ID) & chosen
    kept = (inputs == ids) & chosen
    assert abs(as_mask.sum() / chosen.sum() - 0.8) < 0.02
    assert abs(kept.sum() / chosen.sum() - 0.1) < 0.02  # (a random pick equal to the original counts here)
    assert (inputs[~chosen] == ids[~chosen]).all()
    assert (inputs >= 0).all() and (inputs < 1000).all()


def test_special_tokens_are_never_chosen() -> None:
    ids = batch()
    for seed in range(5):
        _, labels = mask_batch(ids, np.random.default_rng(seed), MaskingConfig(probability=0.9), vocab_size=1000)
        assert (labels[ids < NUM_SPECIAL] == IGNORE_INDEX).all()


def test_same_seed_same_masks() -> None:
    ids = batch()
    a = mask_batch(ids, np.random.default_rng(7), MaskingConfig(), 1000)
    b = mask_batch(ids, np.random.default_rng(7), MaskingConfig(), 1000)
    c = mask_batch(ids, np.random.default_rng(8), MaskingConfig(), 1000)
    assert all((x == y).all() for x, y in zip(a, b))
    assert not (a[1] == c[1]).all()


def test_whole_words_are_masked_together(sp_model, docs) -> None:
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    starts = tokenizer.word_starts(sp)
    rows = [[CLS_ID] + sp.encode(d)[:127] for d in docs[:200]]
    ids = np.array([r + [PAD_ID] * (128 - len(r)) for r in rows])
    _, labels = mask_batch(ids, np.random.default_rng(0), MaskingConfig(whole_word=True), sp.vocab_size(), starts)
    chosen = labels != IGNORE_INDEX
    cont = ~starts[ids] & (ids >= NUM_SPECIAL)  # a piece that continues the word before it
    cont[:, 0] = False
    cont[:, 1:] &= ids[:, :-1] >= NUM_SPECIAL  # (after a special token a piece starts a word)
    assert cont.sum() > 100  # the test text has multi-piece words
    prev = np.roll(chosen, 1, axis=1)
    assert (chosen[cont] == prev[cont]).all()  # every continuation shares its word's choice
    maskable = ids >= NUM_SPECIAL
    assert 0.10 < chosen.sum() / maskable.sum() < 0.20


def test_bad_masking_config_names_the_key() -> None:
    with pytest.raises(ValueError, match="masking.probability"):
        MaskingConfig(probability=1.5)
    with pytest.raises(ValueError, match="masking.replace_mask"):
        MaskingConfig(replace_mask=0.95, replace_random=0.1)
    with pytest.raises(ValueError, match="word-start table"):
        mask_batch(batch(), np.random.default_rng(0), MaskingConfig(whole_word=True), 1000)

"""Small byte-level BPE tokenizers like SmolVLM's (same pre-tokenizer and decoder), trained in memory:
the structured-output tests compile grammars over them without building a checkpoint.

Named bpe.py, not tokenizers.py: the board-path scripts run with tests/support first on sys.path, where
that name would shadow the real library."""

from __future__ import annotations

from typing import Sequence


def byte_level_bpe(corpus: Sequence[str], vocab_size: int, special_tokens: Sequence[str]) -> str:
    """tokenizer.json text of a byte-level BPE trained on ``corpus`` (repeated, so merges are stable)
    with ``special_tokens`` first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(list(corpus) * 30, trainer=trainer)
    return bpe.to_str()

"""Token embeddings with image features spliced in: the decoder's input.

The table is the bundle's ``embed_tokens.npy`` (float16, vocab × hidden), memory-mapped so the
board reads only the rows a prompt uses. Image features replace the rows at the image-token
positions in order, tile-major, exactly as SmolVLM's ``inputs_merger`` does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["EmbeddingTable", "splice"]


class EmbeddingTable:
    def __init__(self, path: str | Path):
        self.table = np.load(str(path), mmap_mode="r")
        self.vocab_size, self.hidden_size = self.table.shape

    @classmethod
    def from_array(cls, array: np.ndarray) -> "EmbeddingTable":
        table = cls.__new__(cls)
        table.table = array
        table.vocab_size, table.hidden_size = array.shape
        return table

    def lookup(self, ids: Sequence[int]) -> np.ndarray:
        """float32 (len(ids), hidden)."""
        index = np.asarray(ids, dtype=np.int64)
        if index.size and (index.min() < 0 or index.max() >= self.vocab_size):
            raise ValueError(f"token id out of range 0..{self.vocab_size - 1}")
        return np.asarray(self.table[index], dtype=np.float32)


def splice(token_embeddings: np.ndarray, ids: Sequence[int], image_id: int,
           features: np.ndarray | None, in_place: bool = False) -> np.ndarray:
    """Replace the rows of ``token_embeddings`` at ``image_id`` positions with ``features``
    ((tiles, seq, hidden) or (n, hidden), in prompt order); returns a float32 array (a new one
    unless ``in_place`` and the input already is float32)."""
    out = token_embeddings if in_place and token_embeddings.dtype == np.float32 else \
        np.array(token_embeddings, dtype=np.float32, copy=True)
    positions = np.flatnonzero(np.asarray(ids) == image_id)
    rows = np.zeros((0, out.shape[1]), np.float32) if features is None else \
        np.asarray(features, dtype=np.float32).reshape(-1, out.shape[1])
    if len(positions) != len(rows):
        raise ValueError(f"the prompt has {len(positions)} image tokens but {len(rows)} image feature rows "
                         "were given: the image expansion and the vision features disagree")
    out[positions] = rows
    return out

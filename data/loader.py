"""Packed fixed-length sequences from token files, in a deterministic, resumable order."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


class TokenStream:
    """Several token files (shards) read as one stream, memory-mapped."""

    def __init__(self, paths, dtype: str):
        paths = [paths] if isinstance(paths, str | Path) else list(paths)
        self.parts = [np.memmap(p, dtype=np.dtype(dtype), mode="r") for p in paths]
        self.starts = np.cumsum([0] + [len(p) for p in self.parts])
        self.paths = paths

    def __len__(self) -> int:
        return int(self.starts[-1])

    def window(self, a: int, b: int) -> np.ndarray:
        """tokens[a:b] as int64 (across shard boundaries when needed)."""
        i = int(np.searchsorted(self.starts, a, side="right")) - 1
        pieces = []
        while a < b:
            lo = a - int(self.starts[i])
            hi = min(b, int(self.starts[i + 1])) - int(self.starts[i])
            pieces.append(self.parts[i][lo:hi])
            a += hi - lo
            i += 1
        out = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
        return np.asarray(out, dtype=np.int64)


def _sequences(tokens: TokenStream, seq_len: int) -> int:
    return (len(tokens) - 1) // seq_len


def _window(tokens: TokenStream, i: int, seq_len: int) -> np.ndarray:
    return tokens.window(i * seq_len, i * seq_len + seq_len + 1)


class PackedLoader:
    """Sequence i is tokens[i*L : i*L + L + 1] (inputs and shifted labels), documents packed
    back to back (``path``: one token file or a list of shards read as one stream). Each epoch
    visits every sequence once in an order drawn from (seed, epoch); ``state_dict`` is the
    position in that order, so a resumed run continues with exactly the batches an
    uninterrupted one would have seen.

    With data parallelism every rank draws the same global batch and keeps its own slice.
    """

    def __init__(
        self,
        path,
        dtype: str,
        seq_len: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world: int = 1,
    ):
        self.tokens = TokenStream(path, dtype)
        self.seq_len = seq_len
        self.n = _sequences(self.tokens, seq_len)
        if self.n < 1:
            raise ValueError(f"{path}: too few tokens for one sequence of {seq_len}")
        if batch_size % world:
            raise ValueError(f"batch size {batch_size} is not divisible by {world} ranks")
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self.epoch, self.index = 0, 0
        self._order = self._make_order(0)

    def _make_order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=g)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        picks = []
        while len(picks) < self.batch_size:
            if self.index >= self.n:
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._make_order(self.epoch)
            picks.append(int(self._order[self.index]))
            self.index += 1
        per_rank = self.batch_size // self.world
        mine = picks[self.rank * per_rank : (self.rank + 1) * per_rank]
        rows = np.stack([_window(self.tokens, i, self.seq_len) for i in mine])
        t = torch.from_numpy(rows)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._make_order(self.epoch)


def eval_batches(path, dtype: str, seq_len: int, batch_size: int, max_batches: int):
    """The first sequences of the validation tokens, in order (the same every evaluation)."""
    tokens = TokenStream(path, dtype)
    n = min(_sequences(tokens, seq_len), batch_size * max_batches)
    if n < 1:
        raise ValueError(f"{path}: too few validation tokens for one sequence of {seq_len}")
    for start in range(0, n, batch_size):
        rows = np.stack(
            [_window(tokens, i, seq_len) for i in range(start, min(n, start + batch_size))]
        )
        t = torch.from_numpy(rows)
        yield t[:, :-1].contiguous(), t[:, 1:].contiguous()

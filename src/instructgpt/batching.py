"""Token ids into batches: one padder, packing, the epoch sampler with an exact resume position, and the
random windows of pretraining shards (for pretraining and for the pretraining mix of SFT and PPO-ptx).

Nothing here knows a stage; every sampler draws from its own seeded generator and saves and restores its
position, so a resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import UserError

IGNORE = -100  # the label of a position that is not trained (prompt, padding): cross-entropy skips it


def pad(seqs: Sequence[Sequence[int]], pad_id: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Ids and attention mask (N, T), each sequence padded on `side` ("left" or "right") to the longest.
    Labels are padded with the same call and pad_id=IGNORE."""
    if side not in ("left", "right"):
        raise ValueError(f"padding side must be 'left' or 'right', got {side!r}")
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        if not len(s):
            continue
        span = slice(T - len(s), T) if side == "left" else slice(0, len(s))
        ids[i, span] = torch.as_tensor(s, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


def pad_labelled(items: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ids, labels (IGNORE on padding) and attention mask (B, T) of (ids, labels) pairs."""
    ids, mask = pad([i for i, _ in items], pad_id)
    labels, _ = pad([lab for _, lab in items], IGNORE)
    return {"ids": ids, "labels": labels, "attention_mask": mask}


def to_device(batch: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


class WindowSampler:
    """Uniformly random windows of `window` consecutive tokens over a list of shards (a window never
    spans two shards). One call draws a whole batch with numpy fancy indexing: no Python per token."""

    def __init__(self, shards: list[np.memmap], window: int):
        self.window = window
        self.shards = [s for s in shards if len(s) >= window]
        counts = np.array([len(s) - window + 1 for s in self.shards], dtype=np.int64)
        self.ends = np.cumsum(counts)  # window starts of shard i are [ends[i-1], ends[i]) globally
        self.starts = self.ends - counts
        self.offsets = np.arange(window, dtype=np.int64)  # (W,)

    @property
    def n_windows(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def sample(self, rng: np.random.Generator, B: int) -> np.ndarray:
        """(B, W) int64 token ids."""
        g = rng.integers(0, self.n_windows, size=B)  # (B,) global window index
        if len(self.shards) == 1:
            return self.shards[0][g[:, None] + self.offsets].astype(np.int64)
        which = np.searchsorted(self.ends, g, side="right")  # (B,) shard of each window
        start = g - self.starts[which]
        out = np.empty((B, self.window), dtype=np.int64)
        for i in np.unique(which):
            rows = which == i
            out[rows] = self.shards[i][start[rows, None] + self.offsets]
        return out

    def sample_by_shard(self, rng: np.random.Generator, B: int) -> np.ndarray:
        """(B, W) int64 token ids, each row from a shard drawn uniformly (not in proportion to its windows),
        then a start within it, drawn row by row: the order of draws the pretraining mix of SFT and PPO-ptx
        has always used, kept so that their runs stay reproducible."""
        shard_ix = rng.integers(len(self.shards), size=B)
        rows = []
        for s in shard_ix:
            shard = self.shards[s]
            start = int(rng.integers(len(shard) - self.window + 1))
            rows.append(np.asarray(shard[start : start + self.window], dtype=np.int64))
        return np.stack(rows)


def prefix_lm_batch(windows: np.ndarray, splits: np.ndarray, start_id: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Windows (B, 2T) cut at splits (B,) in [1, T] -> the encoder's src and src_mask (B, T): w[:s], right
    padded; the decoder's tgt (B, T): start_id then w[s:s+T-1]; labels (B, T): w[s:s+T]."""
    B, W = windows.shape
    T = W // 2
    cols = np.arange(T)
    src_mask = cols[None, :] < splits[:, None]  # (B, T)
    src = np.where(src_mask, windows[:, :T], pad_id)
    labels = windows[np.arange(B)[:, None], splits[:, None] + cols[None, :]]  # (B, T) = w[s:s+T]
    tgt = np.concatenate([np.full((B, 1), start_id, dtype=np.int64), labels[:, :-1]], axis=1)
    return {"src": torch.from_numpy(src), "src_mask": torch.from_numpy(src_mask.astype(np.int64)),
            "tgt": torch.from_numpy(tgt), "labels": torch.from_numpy(np.ascontiguousarray(labels))}


def pack_batch(items: Sequence[Any], pad_id: int, row_length: int) -> dict[str, torch.Tensor]:
    """Examples (each with `.ids` and `.labels`, labels already shifted) laid end to end in rows of
    `row_length` (first fit, in order; an example never spans two rows). `segment_ids` keep examples from
    attending to each other; `position_ids` restart at 0 for each example. Padding gets its own
    segment (-1) and no label."""
    rows: list[list[Any]] = []
    room: list[int] = []
    for e in items:
        for r, free in enumerate(room):
            if len(e.ids) <= free:
                rows[r].append(e)
                room[r] -= len(e.ids)
                break
        else:
            rows.append([e])
            room.append(row_length - len(e.ids))
    B = len(rows)
    T = max(row_length - free for free in room)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    seg = torch.full((B, T), -1, dtype=torch.long)
    pos = torch.zeros((B, T), dtype=torch.long)
    for r, row in enumerate(rows):
        t = 0
        for s, e in enumerate(row):
            n = len(e.ids)
            ids[r, t : t + n] = torch.tensor(e.ids)
            labels[r, t : t + n] = torch.tensor(e.labels)
            seg[r, t : t + n] = s
            pos[r, t : t + n] = torch.arange(n)
            t += n
    return {"ids": ids, "labels": labels, "segment_ids": seg, "position_ids": pos}


class EpochSampler:
    """Shuffled passes over the examples, with a position that a checkpoint saves and restores exactly."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self.epoch, self.pos = 0, 0
        self._order = self._perm(0)

    def _perm(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.pos == self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._perm(self.epoch)
            take = min(k - len(out), self.n - self.pos)
            out.extend(self._order[self.pos : self.pos + take].tolist())
            self.pos += take
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def restore(self, state: dict) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]
        self._order = self._perm(self.epoch)


class PretrainWindows:
    """Random windows from prepared shards, as an SFT-shaped batch, for the pretraining mix of SFT and
    PPO-ptx: `block_size + 1` tokens for a decoder-only model ({"ids", "labels"}); for an encoder-decoder
    (`seq2seq_start` = its decoder's start id) 2 x block_size tokens cut as in prefix-LM pretraining
    ({"src", "src_mask", "ids", "labels"}). Its generator (seeded [seed, 7]) is saved and restored."""

    def __init__(self, data_dir: Path, block_size: int, seed: int, seq2seq_start: int | None = None,
                 pad_id: int = 0):
        from .prepare import load_shards

        meta, shards, _ = load_shards(data_dir)
        self.vocab_size = int(meta["vocab_size"])
        self.sampler = WindowSampler(shards, 2 * block_size if seq2seq_start is not None else block_size + 1)
        if not self.sampler.shards:
            raise UserError(f"{data_dir}: no train shard holds one window of {self.sampler.window} tokens")
        self.block_size = block_size
        self.seq2seq_start, self.pad_id = seq2seq_start, pad_id
        self.rng = np.random.default_rng([seed, 7])

    def batch(self, n: int) -> dict[str, torch.Tensor]:
        w = self.sampler.sample_by_shard(self.rng, n)
        if self.seq2seq_start is None:
            t = torch.from_numpy(w)
            return {"ids": t[:, :-1], "labels": t[:, 1:]}
        splits = self.rng.integers(1, self.block_size + 1, size=n)
        b = prefix_lm_batch(w, splits, self.seq2seq_start, self.pad_id)
        return {"src": b["src"], "src_mask": b["src_mask"], "ids": b["tgt"], "labels": b["labels"]}

    def state(self) -> dict:
        return self.rng.bit_generator.state

    def restore(self, state: dict) -> None:
        self.rng.bit_generator.state = state

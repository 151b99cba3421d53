"""One stream's batches, read shard by shard from its plan (``data_pipeline.loader_state``): the unit a
DataLoader worker (or the main process) serves. Corrupt shards, memory bounds and prefetching are described
in ``data_pipeline.loader``."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from data_pipeline.loader_state import DatasetIndex, StreamPlan
from data_pipeline.manifest import DatasetError
from data_pipeline.shard_reader import _Corrupt, clips_from_bytes, read_clips
from data_pipeline.sources import FetchError
from mebt.errors import first_line


class CorruptShardError(DatasetError):
    """A shard that cannot be read (with ``on_corrupt: fail``)."""


class StreamReader:
    """Builds one stream's batches from its plan, reading each shard when a batch first needs it.

    A shard's block stays in memory until the last of its samples in the plan has been yielded, so memory
    follows the shuffle buffer (the shards with samples still in it), not the whole stream. Shards fetched
    from URLs are bounded too: at most ``max_shards_in_memory`` blocks (the least recently used one not in
    the current batch is dropped and fetched again if needed later), and the next shard of the plan is
    fetched in a background thread while the current ones are consumed.
    """

    def __init__(self, index: DatasetIndex, cfg, plan: StreamPlan, grid: tuple, first: int,
                 layouts: dict):
        self.index, self.cfg, self.plan, self.grid, self.layouts = index, cfg, plan, grid, layouts
        self.num_batches = len(plan.rows) // cfg.batch_size
        upcoming = index.row_shard[plan.rows[first * cfg.batch_size:]]
        shards, uses = np.unique(upcoming, return_counts=True)
        self.uses = dict(zip(shards.tolist(), uses.tolist()))   # samples of each shard still to yield
        self.blocks: dict[int, np.ndarray | None] = {}          # None: the shard is corrupt; in use order
        self.corrupt: list[tuple[str, str]] = []   # found since the last batch, reported with the next one
        self.remote = index.source.remote
        _, first_use = np.unique(upcoming, return_index=True)
        self.order = upcoming[np.sort(first_use)].tolist()      # shards in the order the plan first needs them
        self.next_up = 0
        self.protected: set[int] = set()                        # the current batch's shards: never dropped
        self.pool, self.pending = None, {}                      # the prefetch thread and its fetch

    def _load(self, shard: int) -> None:
        index, name = self.index, self.index.shard_names[shard]
        members, shapes = index.shard_samples(shard)
        size, source = int(index.shard_bytes[shard]), index.source
        sha256 = index.shard_sha256[shard] if self.cfg.verify != "size" else None
        try:
            path = source.local_path(name)
            if path is not None:
                block = read_clips(path, size=size, sha256=sha256, members=members, shapes=shapes,
                                   vocab=index.codebook_size, layouts=self.layouts,
                                   hash_once=self.cfg.verify == "sha256-once")
            else:
                self._make_room()
                pending = self.pending.pop(shard, None)
                data = pending.result() if pending is not None else source.read_shard(name, size)
                block = clips_from_bytes(data, size=size, sha256=sha256, members=members, shapes=shapes,
                                         vocab=index.codebook_size)
        except (_Corrupt, FetchError) as e:
            where = source.shard_url(name)
            if self.cfg.on_corrupt == "fail":
                what = str(e) if isinstance(e, FetchError) else f"shard '{where}' is corrupt: {e}"
                raise CorruptShardError(f"{what} (set on_corrupt: skip to go on without it)") from None
            block = None
            self.corrupt.append((name, first_line(e)))
        self.blocks[shard] = block
        if self.remote:
            self._prefetch()

    def _make_room(self) -> None:
        """Drop least recently used blocks (not the current batch's) down to the limit, minus one for the new one."""
        limit = self.cfg.max_shards_in_memory - 1 - len(self.pending)
        for shard in [s for s, b in self.blocks.items() if b is not None and s not in self.protected]:
            if sum(b is not None for b in self.blocks.values()) <= max(limit, 0):
                break
            del self.blocks[shard]

    def _prefetch(self) -> None:
        """Start fetching the next shard the plan needs that is neither held nor being fetched."""
        source, names = self.index.source, self.index.shard_names
        while self.next_up < len(self.order) and (self.order[self.next_up] in self.blocks
                                                  or self.order[self.next_up] in self.pending
                                                  or source.local_path(names[self.order[self.next_up]]) is not None):
            self.next_up += 1   # held, being fetched, or on disk (cache_dir): nothing to fetch
        held = sum(b is not None for b in self.blocks.values())
        if self.next_up == len(self.order) or self.pending or held >= self.cfg.max_shards_in_memory:
            return
        if self.pool is None:
            self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mebt-prefetch")
        shard = self.order[self.next_up]
        name = self.index.shard_names[shard]
        self.pending[shard] = self.pool.submit(self.index.source.read_shard, name, int(self.index.shard_bytes[shard]))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)

    def _block(self, shard: int) -> np.ndarray | None:
        if shard not in self.blocks:
            self._load(shard)
        self.blocks[shard] = self.blocks.pop(shard)   # most recently used last
        return self.blocks[shard]

    def _stand_in(self, row: int, offset: int) -> tuple[int, int]:
        """(row, offset) standing in for a sample of a corrupt shard: the sample at the same tar position
        (modulo its size) of the next readable shard in the epoch's shard order.

        It depends only on the plan and the files, so a resumed run picks the same one.
        """
        shard = self.index.row_shard[row]
        order = self.plan.shard_order
        layout = self.index.layout
        for other in np.roll(order, -int(np.flatnonzero(order == shard)[0]))[1:].tolist():
            if layout.shard_count[other] and self._block(other) is not None:
                position = self.index.row_index[row] % layout.shard_count[other]
                stand_in = int(layout.rows[layout.shard_start[other] + position])
                if self.cfg.crop_frames is not None:
                    offset = min(offset, int(self.index.frames[stand_in]) - self.cfg.crop_frames)
                return stand_in, offset
        raise CorruptShardError(f"every shard of '{self.index.data_dir}' is corrupt; nothing can stand in for them")

    def _gather(self, rows: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """int64 [B, L, H', W'] codes: one fancy-indexing copy per shard in the batch."""
        shards, positions = self.index.row_shard[rows], self.index.row_index[rows]
        codes = np.empty((len(rows), *self.grid), dtype=np.int64)
        for shard in np.unique(shards).tolist():
            sel = np.flatnonzero(shards == shard)
            if self.cfg.crop_frames is None:
                codes[sel] = self.blocks[shard][positions[sel]]
            else:
                frames = offsets[sel, None] + np.arange(self.cfg.crop_frames)
                codes[sel] = self.blocks[shard][positions[sel, None], frames]
        return codes

    def skip(self, j: int) -> None:
        """Pass over batch ``j`` without reading it (another process takes it): its shards are let go once
        nothing later needs them."""
        rows = self.plan.rows[j * self.cfg.batch_size:(j + 1) * self.cfg.batch_size]
        shards, used = np.unique(self.index.row_shard[rows], return_counts=True)
        for shard, n in zip(shards.tolist(), used.tolist()):
            self.uses[shard] -= n
            if not self.uses[shard]:
                self.blocks.pop(shard, None)

    def batch(self, j: int) -> dict:
        s = slice(j * self.cfg.batch_size, (j + 1) * self.cfg.batch_size)
        rows, offsets, pad = self.plan.rows[s].copy(), self.plan.frame_offsets[s].copy(), self.plan.pad[s].copy()
        shards = self.index.row_shard[rows]
        in_batch, used = np.unique(shards, return_counts=True)   # before stand-ins replace corrupt rows
        self.protected = set(in_batch.tolist())
        corrupt = [shard for shard in in_batch.tolist() if self._block(shard) is None]
        if corrupt:
            bad = np.flatnonzero(np.isin(shards, corrupt))
            for i in bad.tolist():
                rows[i], offsets[i] = self._stand_in(int(rows[i]), int(offsets[i]))
                self.protected.add(int(self.index.row_shard[rows[i]]))
            pad[bad] = True
        codes = self._gather(rows, offsets)
        for shard, n in zip(in_batch.tolist(), used.tolist()):
            self.uses[shard] -= n
            if not self.uses[shard]:
                self.blocks.pop(shard, None)
        self.protected = set()
        found, self.corrupt = self.corrupt, []
        return {"codes": torch.from_numpy(codes), **self.index.metadata(rows),
                "frame_offset": torch.from_numpy(offsets), "pad": torch.from_numpy(pad), "corrupt_shards": found}

"""The Batch API's persistence: files, batches and per-line results in one LMDB environment.

A line's result and its batch's counters are written in one transaction, and a result already
stored for a line is never overwritten: after a crash at any instant the store holds every line
that finished exactly once, and a restarted gateway runs only the lines without a result. LMDB
commits are durable (fsync) by default, so this holds across a power loss too.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import lmdb
import msgspec

from services.gateway.batch.records import BatchRecord, FileRecord, LineResult

__all__ = ["BatchStore"]

_FILES, _FILE_DATA, _BATCHES, _RESULTS = b"files", b"file_data", b"batches", b"results"


def _result_key(batch_id: str, index: int) -> bytes:
    return f"{batch_id}/{index:010d}".encode()


class BatchStore:
    def __init__(self, path: str, map_size: int = 8 << 30) -> None:
        os.makedirs(path, exist_ok=True)
        self.path = path
        self.env = lmdb.open(path, map_size=map_size, max_dbs=4, subdir=True)
        self._files = self.env.open_db(_FILES)
        self._data = self.env.open_db(_FILE_DATA)
        self._batches = self.env.open_db(_BATCHES)
        self._results = self.env.open_db(_RESULTS)
        self._enc = msgspec.msgpack.Encoder()
        self._file_dec = msgspec.msgpack.Decoder(FileRecord)
        self._batch_dec = msgspec.msgpack.Decoder(BatchRecord)
        self._result_dec = msgspec.msgpack.Decoder(LineResult)

    def close(self) -> None:
        self.env.close()

    # ---- files ----------------------------------------------------------------------------

    def put_file(self, record: FileRecord, data: bytes | None) -> None:
        with self.env.begin(write=True) as txn:
            txn.put(record.id.encode(), self._enc.encode(record), db=self._files)
            if data is not None:
                txn.put(record.id.encode(), data, db=self._data)

    def get_file(self, file_id: str) -> FileRecord | None:
        with self.env.begin() as txn:
            raw = txn.get(file_id.encode(), db=self._files)
        return None if raw is None else self._file_dec.decode(raw)

    def list_files(self) -> list[FileRecord]:
        with self.env.begin() as txn:
            return [self._file_dec.decode(v) for _, v in txn.cursor(db=self._files)]

    def file_data(self, file_id: str) -> bytes | None:
        with self.env.begin() as txn:
            raw = txn.get(file_id.encode(), db=self._data)
        return None if raw is None else bytes(raw)

    def delete_file(self, file_id: str) -> bool:
        with self.env.begin(write=True) as txn:
            txn.delete(file_id.encode(), db=self._data)
            return txn.delete(file_id.encode(), db=self._files)

    # ---- batches --------------------------------------------------------------------------

    def put_batch(self, record: BatchRecord) -> None:
        with self.env.begin(write=True) as txn:
            txn.put(record.id.encode(), self._enc.encode(record), db=self._batches)

    def get_batch(self, batch_id: str) -> BatchRecord | None:
        with self.env.begin() as txn:
            raw = txn.get(batch_id.encode(), db=self._batches)
        return None if raw is None else self._batch_dec.decode(raw)

    def list_batches(self) -> list[BatchRecord]:
        with self.env.begin() as txn:
            return [self._batch_dec.decode(v) for _, v in txn.cursor(db=self._batches)]

    # ---- results --------------------------------------------------------------------------

    def commit_result(self, batch_id: str, result: LineResult) -> BatchRecord | None:
        """Store one line's result and count it, atomically; None if the line already had one."""
        key = _result_key(batch_id, result.index)
        with self.env.begin(write=True) as txn:
            raw_batch = txn.get(batch_id.encode(), db=self._batches)
            if raw_batch is None or not txn.put(key, self._enc.encode(result), overwrite=False, db=self._results):
                return None
            batch = self._batch_dec.decode(raw_batch)
            if result.ok:
                batch.completed += 1
            else:
                batch.failed += 1
            txn.put(batch_id.encode(), self._enc.encode(batch), db=self._batches)
            return batch

    def finished_indices(self, batch_id: str) -> set[int]:
        prefix = f"{batch_id}/".encode()
        out = set()
        with self.env.begin() as txn:
            cursor = txn.cursor(db=self._results)
            if cursor.set_range(prefix):
                for key in cursor.iternext(values=False):
                    if not key.startswith(prefix):
                        break
                    out.add(int(key[len(prefix):]))
        return out

    def results(self, batch_id: str) -> Iterator[LineResult]:
        """Every stored result of a batch, in input-line order."""
        prefix = f"{batch_id}/".encode()
        with self.env.begin() as txn:
            cursor = txn.cursor(db=self._results)
            if not cursor.set_range(prefix):
                return
            for key, value in cursor:
                if not key.startswith(prefix):
                    break
                yield self._result_dec.decode(value)

"""Where a run's outputs live: a local folder or any fsspec URL (``s3://``, ``gs://``, ``memory://``).

Every write is whole-or-nothing: the bytes go to ``<name>.<pid>@<host>.<token>.part`` first and
are then moved onto the final name (``os.replace`` on local disks; on object stores a server-side
copy, so the final object appears whole or not at all), so a reader or a rerun never sees a
half-written part, marker or table.
The downloaded L2 files themselves are not kept here but in a local ``cache_dir``: photometry
memory-maps them.
"""

from __future__ import annotations

import json
import os
import posixpath
import secrets
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import polars as pl

from spxframe import schema


def is_url(path: str | os.PathLike) -> bool:
    """True for ``proto://…`` other than ``file://``."""
    s = str(path)
    return "://" in s and not s.startswith("file://")


class Store:
    """A run's output folder. ``root``: a path or fsspec URL; ``storage_options`` go to fsspec."""

    def __init__(self, root: str | os.PathLike, storage_options: dict | None = None, *,
                 create: bool = True) -> None:
        import fsspec

        root = os.path.expanduser(str(root)) if not is_url(root) else str(root)
        self.fs, self.root = fsspec.core.url_to_fs(root, **(storage_options or {}))
        self.local = not is_url(root)
        self.url = self.root if self.local else root  #: absolute path, or the URL
        if create:
            self.fs.makedirs(self.root, exist_ok=True)

    def path(self, rel: str) -> str:
        return posixpath.join(self.root, rel)

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.path(rel))

    def glob(self, pattern: str) -> list[str]:
        """Paths relative to the root matching ``pattern``."""
        n = len(self.root.rstrip("/")) + 1
        return sorted(p[n:] if p.startswith(self.root.rstrip("/")) else p
                      for p in self.fs.glob(self.path(pattern)))

    @contextmanager
    def _atomic(self, rel: str) -> Iterator[Any]:
        final = self.path(rel)
        self.fs.makedirs(posixpath.dirname(final), exist_ok=True)
        tmp = f"{final}.{os.getpid()}@{socket.gethostname()}.{secrets.token_hex(4)}.part"
        try:
            with self.fs.open(tmp, "wb") as f:
                yield f
            if self.local:
                os.replace(tmp, final)  # atomic; raises if final is a directory
            else:
                self.fs.mv(tmp, final)
        finally:
            if self.fs.exists(tmp):
                self.fs.rm(tmp)

    def write_bytes(self, rel: str, data: bytes) -> None:
        with self._atomic(rel) as f:
            f.write(data)

    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self.path(rel))

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())

    def read_json(self, rel: str) -> Any | None:
        """The object, or None when missing or unreadable."""
        try:
            return json.loads(self.read_bytes(rel))
        except (OSError, ValueError):
            return None

    def write_parquet(self, rel: str, df: pl.DataFrame, table: schema.Table | None = None, *,
                      row_group_size: int | None = None) -> None:
        """Write ``df`` as Parquet (zstd), units and descriptions of ``table`` in the metadata."""
        import pyarrow.parquet as pq

        tab = with_units(df.to_arrow(), table)
        with self._atomic(rel) as f:
            pq.write_table(tab, f, row_group_size=row_group_size, compression="zstd")

    def read_parquet(self, rel: str) -> pl.DataFrame:
        with self.fs.open(self.path(rel), "rb") as f:
            return pl.read_parquet(f)

    @contextmanager
    def parquet_writer(self, rel: str, arrow_schema: Any) -> Iterator[Any]:
        """A ``pyarrow.parquet.ParquetWriter`` whose file appears only if the block completes."""
        import pyarrow.parquet as pq

        with self._atomic(rel) as f:
            w = pq.ParquetWriter(f, arrow_schema, compression="zstd")
            try:
                yield w
            finally:
                w.close()

    def put_dir(self, local_dir: str, rel: str) -> None:
        """Copy a local folder's files (plots) under ``rel``."""
        for name in sorted(os.listdir(local_dir)):
            p = os.path.join(local_dir, name)
            if os.path.isfile(p):
                with open(p, "rb") as fh:
                    self.write_bytes(posixpath.join(rel, name), fh.read())


def with_units(tab: Any, table: schema.Table | None) -> Any:
    """``tab`` (pyarrow) with ``table``'s units and descriptions in its schema metadata."""
    if table is None:
        return tab
    meta = dict(tab.schema.metadata or {})
    meta.update(schema.parquet_metadata(table))
    meta.update(schema.astropy_meta(tab, table))  # astropy's QTable.read gets the units too
    return tab.replace_schema_metadata(meta)

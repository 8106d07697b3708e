"""The precompute's finishing pass: every (resolution, key) of the output once (pipelines/data/precompute.py runs
it before the manifest says "complete").

Doubles come from a block re-executed with another composition after its worker died (its parts get another
name) and from a key recomputed because its source changed (the old row stays in an older part). Per
(resolution, key) the row of the most recently modified part wins (ties: the first part by name; equal
mtimes mean the same block written twice, identical rows); a latent row also loses to a newer error row of
its key at that resolution (the changed source failed). The losing parts are rewritten without those rows,
atomically (or deleted when nothing is left), so a pass interrupted halfway is finished by the next one.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.data.latent_store import read_columns, res_dir
from pipelines.storage import join, list_files, write_bytes_atomic


@dataclass
class Part:
    path: str
    mtime: float
    rows: list[tuple[str, int | None]]  # (key, res) of each row; errors/: res None is every resolution


def _parts(fs: pafs.FileSystem, folder: str, res: int | None) -> list[Part]:
    """The parts under `folder`, newest first (ties: by name); `res`: the folder's resolution (None: errors/)."""
    files = [f for f in list_files(fs, folder) if f.endswith(".parquet")]
    parts = []
    for info in fs.get_file_info(files):
        table = read_columns(fs, info.path, ["key"] if res is not None else ["key", "res"])
        keys = table["key"].to_pylist()
        parts.append(Part(info.path, info.mtime.timestamp() if info.mtime else 0.0,
                          list(zip(keys, [res] * len(keys) if res is not None else table["res"].to_pylist()))))
    return sorted(parts, key=lambda p: (-p.mtime, p.path))


def _losers(parts: list[Part], newest: dict[tuple[str, int | None], Part]) -> dict[str, set]:
    """Part path -> its rows that a newer part's row of the same (key, res) replaces; fills `newest`."""
    drop: dict[str, set] = {}
    for part in parts:  # newest first: the first part to hold a (key, res) keeps it
        for row in part.rows:
            if newest.setdefault(row, part) is not part:
                drop.setdefault(part.path, set()).add(row)
    return drop


def dedupe(fs: pafs.FileSystem, root: str, resolutions: Iterable[int]) -> int:
    """Remove every row of the output at `root` that another, newer row of its (resolution, key) replaces;
    returns the number of rows removed."""
    errors = _parts(fs, join(root, "errors"), None)
    newest_error: dict[tuple[str, int | None], Part] = {}
    drop = _losers(errors, newest_error)  # the same error twice (a re-executed block): the newest copy stays
    for res in resolutions:
        latents = _parts(fs, res_dir(root, res), res)
        newest: dict[tuple[str, int | None], Part] = {}
        drop.update(_losers(latents, newest))
        for (key, _), part in newest.items():  # a newer error of the key (its changed source failed) wins
            error = newest_error.get((key, res)) or newest_error.get((key, None))
            if error is not None and error.mtime > part.mtime:
                drop.setdefault(part.path, set()).add((key, res))
    return sum(_rewrite(fs, path, rows) for path, rows in drop.items())


def _rewrite(fs: pafs.FileSystem, path: str, rows: set[tuple[str, int | None]]) -> int:
    """Rewrite the part at `path` without `rows` ((key, res) pairs); returns how many rows went."""
    table = pq.read_table(path, filesystem=fs)
    if "res" in table.column_names:  # errors/
        res = table["res"].to_pylist()
    else:  # res=R/: every row of one resolution
        res = [next(iter(rows))[1]] * table.num_rows
    gone = pa.array([(k, r) in rows for k, r in zip(table["key"].to_pylist(), res)])
    kept = table.filter(pc.invert(gone))
    if kept.num_rows == 0:
        fs.delete_file(path)
    else:
        buf = io.BytesIO()
        pq.write_table(kept, buf, compression="zstd")
        write_bytes_atomic(fs, path, buf.getvalue())
    return table.num_rows - kept.num_rows

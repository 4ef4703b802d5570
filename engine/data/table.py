"""Rows of a local Parquet / ORC table as a record stream, for CaffeOnSpark's CoSData layer when
the engine runs alone: each record is (key, tuple of the asked columns' values), the key the
row's `id` column where the table has one, else its row number.

Spark feeds the layer on a cluster (caffeonspark.sources.columns); this reader lets
`python -m engine` train and test the same prototxt on a table on the local disk.
"""

import os

from engine.data.sources import DataSourceError, RecordSource

FORMATS = ("parquet", "orc")
ID_COLUMN = "id"
_BATCH_ROWS = 1024


class TableSource(RecordSource):
    """The rows of the table at `path` (a file or a folder of part files, as Spark writes
    them), columns `columns` in that order, read a batch of rows at a time."""

    def __init__(self, path, columns, fmt="parquet"):
        import pyarrow as pa
        import pyarrow.dataset as ds

        self.path = path
        self.columns = list(columns)
        self.name = f"table {path}"
        if fmt not in FORMATS:
            raise DataSourceError(
                f"{self.name}: dataframe_format {fmt!r}: the engine reads {' and '.join(FORMATS)} "
                "tables (other formats: run the job through caffeonspark)"
            )
        if not os.path.exists(path):
            raise DataSourceError(f"{self.name} not found")
        try:
            self._dataset = ds.dataset(path, format=fmt)
        except (OSError, pa.ArrowInvalid) as e:
            raise DataSourceError(f"{self.name}: cannot read it as {fmt}: {e}") from None
        have = self._dataset.schema.names
        missing = [c for c in self.columns if c not in have]
        if missing:
            raise DataSourceError(
                f"{self.name} has no column(s) {', '.join(missing)} "
                f"(it has {', '.join(have) or 'none'})"
            )
        self._with_id = ID_COLUMN in have and ID_COLUMN not in self.columns
        self._count = self._dataset.count_rows()

    def one_pass(self):
        read = self.columns + ([ID_COLUMN] if self._with_id else [])
        row = 0
        for batch in self._dataset.to_batches(columns=read, batch_size=_BATCH_ROWS):
            values = [batch.column(i).to_pylist() for i in range(len(self.columns))]
            ids = batch.column(len(self.columns)).to_pylist() if self._with_id else None
            for i in range(batch.num_rows):
                key = str(ids[i]) if ids is not None and ids[i] is not None else str(row)
                yield key.encode("utf-8"), tuple(v[i] for v in values)
                row += 1

    def __len__(self):
        return self._count

"""Reads Tessera output tables the way a BI user would, and prints what it saw as JSON.

usage: read_tables.py OUTPUT_LOCATION TABLE [TABLE ...]

For each table: the Delta version and rows (deltalake), the Arrow types of the Parquet files
(pyarrow), and the column types and row count DuckDB reports over the same data.
"""
import json
import os
import sys

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
from deltalake import DeltaTable
from pyarrow import fs


def s3_options():
    return {
        "AWS_ACCESS_KEY_ID": os.environ["AWS_ACCESS_KEY_ID"],
        "AWS_SECRET_ACCESS_KEY": os.environ["AWS_SECRET_ACCESS_KEY"],
        "AWS_REGION": os.environ.get("AWS_REGION", "us-east-1"),
        "AWS_ENDPOINT_URL": os.environ["AWS_ENDPOINT_URL"],
        "AWS_ALLOW_HTTP": "true",
    }


def main():
    root, tables = sys.argv[1].rstrip("/"), sys.argv[2:]
    remote = root.startswith("s3://")
    options = s3_options() if remote else None
    s3 = None
    if remote:
        endpoint = os.environ["AWS_ENDPOINT_URL"].split("://", 1)[1]
        s3 = fs.S3FileSystem(endpoint_override=endpoint, scheme="http", region="us-east-1")
    seen = {}
    con = duckdb.connect()
    for name in tables:
        uri = f"{root}/{name}"
        table = DeltaTable(uri, storage_options=options)
        files = table.file_uris()
        paths = []
        if not files:
            # A table committed with no rows has no data files; its schema lives in the log.
            arrow = pa.schema(table.schema().to_arrow()).empty_table()
        elif remote:
            arrow = pq.read_table([f.split("://", 1)[1] for f in files], filesystem=s3)
        else:
            paths = [f.split("://", 1)[1] if f.startswith("file://") else f for f in files]
            arrow = pq.read_table(paths)
        if remote or not paths:
            # DuckDB's S3 support is an extension it downloads; query the Arrow table instead.
            con.register("t", arrow)
            relation = con.sql("SELECT * FROM t")
        else:
            relation = con.sql(f"SELECT * FROM read_parquet({paths!r})")
        duck_types = dict(zip(relation.columns, [str(t) for t in relation.types]))
        duck_rows = relation.aggregate("count(*)").fetchall()[0][0]
        seen[name] = {
            "version": table.version(),
            "rows": arrow.num_rows,
            "arrow_types": {f.name: str(f.type) for f in arrow.schema},
            "duckdb_types": duck_types,
            "duckdb_rows": duck_rows,
        }
        if remote or not paths:
            con.unregister("t")
    print(json.dumps(seen))


if __name__ == "__main__":
    main()

"""Computes the bundled project's segments with DuckDB from the same resolved events, and
compares each with the members Tessera published.

usage: segments_duckdb.py RESOLVED_EVENTS.parquet OUTPUT_DIR AS_OF

The SQL here is written for DuckDB independently of queries/segments/ (and of the trait
queries high_value builds on), so an agreement means two engines read the rules the same way.
Prints JSON {segment: {"duckdb": n, "tessera": n, "same": bool}}.
"""
import json
import sys

import duckdb
from deltalake import DeltaTable

events, output, as_of = sys.argv[1], sys.argv[2].rstrip("/"), sys.argv[3]
con = duckdb.connect()
con.execute(f"CREATE VIEW e AS SELECT * FROM read_parquet('{events}')")
con.execute(f"CREATE MACRO as_of() AS TIMESTAMPTZ '{as_of}'")

segments = {
    "high_value": """
        SELECT profile_id FROM e WHERE event = 'Order Completed'
        GROUP BY profile_id
        HAVING sum(json_extract_string(properties, '$.revenue')::DOUBLE) >= 200""",
    "active_30d": """
        SELECT profile_id FROM e GROUP BY profile_id
        HAVING max("timestamp") >= as_of() - INTERVAL 30 DAY""",
    "cart_abandoners": """
        SELECT DISTINCT profile_id FROM e
        WHERE event IN ('Product Viewed', 'Product Added') AND "timestamp" >= as_of() - INTERVAL 7 DAY
          AND profile_id NOT IN (SELECT profile_id FROM e WHERE event = 'Order Completed'
                                 AND "timestamp" >= as_of() - INTERVAL 7 DAY)""",
    "lapsed_buyers": """
        SELECT profile_id FROM e WHERE event = 'Order Completed'
        GROUP BY profile_id HAVING max("timestamp") < as_of() - INTERVAL 21 DAY""",
}
segments["high_value_active"] = (
    f"SELECT profile_id FROM ({segments['high_value']}) INTERSECT SELECT profile_id FROM ({segments['active_30d']})"
)

report = {}
for name, sql in segments.items():
    duck = {row[0] for row in con.sql(sql).fetchall()}
    table = DeltaTable(f"{output}/segments/{name}")
    files = [f.split("://", 1)[1] if f.startswith("file://") else f for f in table.file_uris()]
    ours = set()
    if files:
        ours = {row[0] for row in con.sql(f"SELECT profile_id FROM read_parquet({files!r})").fetchall()}
    report[name] = {"duckdb": len(duck), "tessera": len(ours), "same": duck == ours}
print(json.dumps(report))

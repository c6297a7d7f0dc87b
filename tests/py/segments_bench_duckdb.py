"""The segments benchmark's DuckDB side: profiles (the bundled computed traits) and the same
segments, from Tessera's resolved events, each segment written to Parquet as Tessera does.

usage: segments_bench_duckdb.py RESOLVED_EVENTS.parquet SEGMENTS_DIR OUT_DIR AS_OF
SEGMENTS_DIR holds DuckDB versions of the segment files (name.sql). Prints JSON with seconds
and peak RSS.
"""
import json
import os
import sys
import time

import duckdb

events, seg_dir, out, as_of = sys.argv[1:5]
os.makedirs(out, exist_ok=True)
con = duckdb.connect()
started = time.perf_counter()
con.execute(f"CREATE VIEW e AS SELECT * FROM read_parquet('{events}')")
con.execute(f"CREATE MACRO as_of() AS TIMESTAMPTZ '{as_of}'")
con.execute("CREATE VIEW events AS SELECT * FROM e")
con.execute("""
CREATE TABLE profiles AS
WITH base AS (
    SELECT profile_id, min("timestamp") AS first_seen, max("timestamp") AS last_seen, count(*) AS event_count
    FROM e GROUP BY profile_id),
oc AS (SELECT profile_id, count(*) AS orders_90d FROM e
       WHERE event = 'Order Completed' AND "timestamp" >= as_of() - INTERVAL 90 DAY GROUP BY profile_id),
rev AS (SELECT profile_id, sum(r) AS revenue_total, avg(r) AS order_value_avg, min(r) AS order_value_min, max(r) AS order_value_max
        FROM (SELECT profile_id, json_extract_string(properties, '$.revenue')::DOUBLE AS r FROM e WHERE event = 'Order Completed')
        GROUP BY profile_id),
fav AS (SELECT profile_id, mode(json_extract_string(properties, '$.category')) AS favourite_category
        FROM e WHERE event = 'Product Viewed' GROUP BY profile_id),
src AS (SELECT profile_id, arg_min(s, "timestamp") AS first_source, arg_max(s, "timestamp") AS last_source
        FROM (SELECT profile_id, "timestamp", json_extract_string(context, '$.campaign.source') AS s FROM e)
        WHERE s IS NOT NULL GROUP BY profile_id),
vp AS (SELECT profile_id, list(DISTINCT p ORDER BY p) AS viewed_products_30d, count(DISTINCT p) AS viewed_product_count_30d
       FROM (SELECT profile_id, json_extract_string(properties, '$.product_id') AS p FROM e
             WHERE event = 'Product Viewed' AND "timestamp" >= as_of() - INTERVAL 30 DAY)
       GROUP BY profile_id)
SELECT * FROM base LEFT JOIN oc USING (profile_id) LEFT JOIN rev USING (profile_id)
     LEFT JOIN fav USING (profile_id) LEFT JOIN src USING (profile_id) LEFT JOIN vp USING (profile_id)
""")
con.execute(f"COPY profiles TO '{out}/profiles.parquet' (FORMAT parquet)")
profiles_done = time.perf_counter()
names = sorted(f[:-4] for f in os.listdir(seg_dir) if f.endswith(".sql"))
done = set()
while len(done) < len(names):
    for name in names:
        if name in done:
            continue
        sql = open(os.path.join(seg_dir, name + ".sql")).read()
        if any(f"seg_{other}" in sql for other in names if other not in done and other != name):
            continue
        con.execute(f"CREATE TABLE seg_{name} AS {sql}")
        con.execute(f"COPY seg_{name} TO '{out}/{name}.parquet' (FORMAT parquet)")
        done.add(name)
finished = time.perf_counter()
print(json.dumps({
    "profiles_s": profiles_done - started,
    "segments_s": finished - profiles_done,
    "total_s": finished - started,
    "segments": len(names),
    # VmHWM, not ru_maxrss: the latter carries the parent's peak across fork and exec.
    "peak_rss_mib": int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM:"))) / 1024,
}))

"""The bundled project's pipeline in DuckDB SQL: the baseline `tessera bench` compares with.

Same input files, same stages, same outputs as `tessera run` on the bundled project:
checks and quarantine, one row per message_id, identity by connected components
(large-star / small-star rounds, the best-known way to do it in SQL), events with their
profile, profiles with identifier lists, last-known and computed traits, the five segments.
Tables are written as Parquet (Tessera writes Delta tables, which are Parquet plus a log).

What SQL cannot do the way Tessera does, and is left out here (so DuckDB does less work):
per-profile identifier limits (user_id 1, email 3, phone 2), which need links applied in
time order; stable profile ids across runs; the merge and conflict tables.

Prints one JSON object: {"stages": [{"stage", "ms", "rows", "peak_rss_bytes", "bytes_read",
"spill_bytes"}, ...]} with the same meaning as `tessera run --json`.
"""

import argparse
import json
import os
import shutil
import threading
import time

import duckdb

PAGE = os.sysconf("SC_PAGE_SIZE")


def resident_bytes():
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * PAGE
    except OSError:
        return 0


def bytes_read():
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("rchar:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def folder_bytes(path):
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                pass
    return total


class Meter:
    """Wall time, peak RSS, bytes read and peak spill of one stage (sampled every 25 ms)."""

    def __init__(self, spill_dir):
        self.spill_dir = spill_dir
        self.peak_rss = resident_bytes()
        self.peak_spill = folder_bytes(spill_dir)
        self.read0 = bytes_read()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.started = time.perf_counter()
        self.thread.start()

    def sample(self):
        while not self.stop.wait(0.025):
            self.peak_rss = max(self.peak_rss, resident_bytes())
            self.peak_spill = max(self.peak_spill, folder_bytes(self.spill_dir))

    def finish(self, stage, rows):
        ms = int((time.perf_counter() - self.started) * 1000)
        self.stop.set()
        self.thread.join()
        return {
            "stage": stage,
            "ms": ms,
            "rows": int(rows),
            "peak_rss_bytes": max(self.peak_rss, resident_bytes()),
            "bytes_read": bytes_read() - self.read0,
            "spill_bytes": self.peak_spill,
        }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", required=True, help="folder of event Parquet files")
    parser.add_argument("--work", required=True, help="scratch folder for the database and outputs")
    parser.add_argument("--as-of", required=True, help="the run's as-of time, ISO 8601 UTC")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--memory-limit", default=None, help="DuckDB memory_limit, e.g. 4GiB")
    args = parser.parse_args()

    work = args.work
    shutil.rmtree(work, ignore_errors=True)
    out = os.path.join(work, "out")
    spill = os.path.join(work, "spill")
    os.makedirs(out)
    os.makedirs(spill)
    con = duckdb.connect(os.path.join(work, "bench.duckdb"))
    con.execute(f"SET threads = {args.threads}")
    con.execute(f"SET temp_directory = '{spill}'")
    con.execute("SET preserve_insertion_order = false")
    if args.memory_limit:
        con.execute(f"SET memory_limit = '{args.memory_limit}'")
    as_of = f"TIMESTAMPTZ '{args.as_of}'"
    files = os.path.join(args.events, "**", "*.parquet")
    stages = []

    def count(table):
        return con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]

    def copy(table, name):
        con.execute(f"COPY {table} TO '{os.path.join(out, name)}.parquet' (FORMAT parquet)")

    # Checks, quarantine, one row per message_id, the event history written out.
    m = Meter(spill)
    con.execute(f"""
        CREATE TABLE checked AS
        SELECT message_id, type, event, anonymous_id, user_id, "timestamp", received_at,
               traits, properties, context,
               CASE WHEN message_id IS NULL OR trim(message_id) = '' THEN 'missing message_id'
                    WHEN type IS NULL OR trim(type) = '' THEN 'missing type'
                    WHEN type NOT IN ('track', 'identify', 'page', 'screen', 'group', 'alias') THEN 'unknown type'
                    WHEN "timestamp" IS NULL THEN 'missing timestamp'
                    WHEN traits IS NOT NULL AND NOT json_valid(traits) THEN 'invalid JSON in traits'
                    WHEN properties IS NOT NULL AND NOT json_valid(properties) THEN 'invalid JSON in properties'
                    WHEN context IS NOT NULL AND NOT json_valid(context) THEN 'invalid JSON in context'
               END AS reason
        FROM read_parquet('{files}', union_by_name = true)
    """)
    rows_read = count("checked")
    con.execute("CREATE TABLE rejected AS SELECT * FROM checked WHERE reason IS NOT NULL")
    con.execute("""
        CREATE TABLE events AS
        SELECT DISTINCT ON (message_id) * EXCLUDE (reason) FROM checked WHERE reason IS NULL
    """)
    con.execute("DROP TABLE checked")
    copy("rejected", "rejected_events")
    copy("events", "events")
    stages.append(m.finish("events", rows_read))
    events = count("events")

    # Identity: identifiers per event, nodes, star edges, large-star / small-star to a fixpoint.
    m = Meter(spill)
    con.execute("""
        CREATE TABLE ids AS
        WITH raw AS (
            SELECT message_id, "timestamp" AS seen_at, 0 AS t, trim(user_id) AS v FROM events
            UNION ALL
            SELECT message_id, "timestamp", 1, lower(trim(json_extract_string(traits, '$.email'))) FROM events
            UNION ALL
            SELECT message_id, "timestamp", 2,
                   CASE WHEN trim(json_extract_string(traits, '$.phone')) LIKE '+%'
                        THEN regexp_replace(json_extract_string(traits, '$.phone'), '[^0-9]', '', 'g')
                        ELSE '1' || ltrim(regexp_replace(json_extract_string(traits, '$.phone'), '[^0-9]', '', 'g'), '0')
                   END
            FROM events
            UNION ALL
            SELECT message_id, "timestamp", 3, trim(anonymous_id) FROM events
        )
        SELECT message_id, seen_at, t, v FROM raw
        WHERE v IS NOT NULL AND v <> ''
          AND (t <> 1 OR (regexp_full_match(v, '[^@]+@[^@]+') AND v <> 'test@test.com'))
          AND (t <> 2 OR length(v) BETWEEN 8 AND 15)
    """)
    con.execute("""
        CREATE TABLE nodes AS
        SELECT row_number() OVER () AS id, t, v FROM (SELECT DISTINCT t, v FROM ids)
    """)
    con.execute("CREATE TABLE en AS SELECT i.message_id, n.id FROM ids i JOIN nodes n USING (t, v)")
    # An anonymous_id on events with more than 20 other identifiers (a broken SDK constant)
    # links nothing, as [[identity.identifiers]] max_links = 20 says.
    con.execute("""
        CREATE TABLE linkable AS
        SELECT en.* FROM en JOIN nodes n USING (id)
        WHERE n.t <> 3 OR id NOT IN (
            SELECT a.id FROM en a JOIN en b USING (message_id)
            JOIN nodes na ON na.id = a.id
            WHERE na.t = 3 AND b.id <> a.id
            GROUP BY a.id HAVING count(DISTINCT b.id) > 20)
    """)
    con.execute("""
        CREATE TABLE edges AS
        WITH star AS (SELECT message_id, min(id) AS centre FROM linkable GROUP BY message_id)
        SELECT DISTINCT l.id AS a, s.centre AS b FROM linkable l JOIN star s USING (message_id)
        WHERE l.id <> s.centre
    """)
    rounds = 0
    while True:
        rounds += 1
        before = con.execute("SELECT count(*), sum(hash(a, b)) FROM edges").fetchone()
        # Large star: every neighbour larger than u points at u's smallest neighbour (or u).
        con.execute("""
            CREATE OR REPLACE TABLE edges AS
            WITH nb AS (SELECT a AS u, b AS v FROM edges UNION SELECT b, a FROM edges),
                 m AS (SELECT u, least(u, min(v)) AS mu FROM nb GROUP BY u)
            SELECT DISTINCT nb.v AS a, m.mu AS b FROM nb JOIN m USING (u) WHERE nb.v > nb.u
        """)
        # Small star: u and its smaller neighbours all point at the smallest of them.
        con.execute("""
            CREATE OR REPLACE TABLE edges AS
            WITH d AS (SELECT greatest(a, b) AS u, least(a, b) AS v FROM edges WHERE a <> b),
                 m AS (SELECT u, min(v) AS mu FROM d GROUP BY u)
            SELECT DISTINCT d.v AS a, m.mu AS b FROM d JOIN m USING (u) WHERE d.v <> m.mu
            UNION
            SELECT u, mu FROM m
        """)
        after = con.execute("SELECT count(*), sum(hash(a, b)) FROM edges").fetchone()
        if after == before or rounds >= 100:
            break
    con.execute("""
        CREATE TABLE graph AS
        WITH comp AS (SELECT greatest(a, b) AS id, min(least(a, b)) AS root FROM edges GROUP BY 1)
        SELECT n.id, n.t, n.v, 'p-' || coalesce(c.root, n.id) AS profile_id
        FROM nodes n LEFT JOIN comp c USING (id)
    """)
    con.execute("""
        CREATE TABLE identity_graph AS
        SELECT ['user_id', 'email', 'phone', 'anonymous_id'][g.t + 1] AS identifier_type,
               g.v AS identifier_value, g.profile_id, min(i.seen_at) AS first_seen, max(i.seen_at) AS last_seen
        FROM graph g JOIN ids i USING (t, v)
        GROUP BY ALL
    """)
    copy("identity_graph", "identity_graph")
    stages.append(m.finish("identity", events))
    identifiers = count("nodes")

    # Each event with the profile of its highest-priority identifier.
    m = Meter(spill)
    con.execute("""
        CREATE TABLE resolved AS
        WITH ep AS (
            SELECT en.message_id, arg_min(g.profile_id, g.t) AS profile_id
            FROM en JOIN graph g USING (id) GROUP BY en.message_id)
        SELECT e.*, ep.profile_id FROM events e LEFT JOIN ep USING (message_id)
    """)
    stages.append(m.finish("resolved_events", events))

    # Profiles: identifier lists, first/last seen, last-known traits, the five trait queries.
    m = Meter(spill)
    con.execute(f"""
        CREATE TABLE profiles AS
        WITH lists AS (
            SELECT profile_id,
                   list(v ORDER BY v) FILTER (WHERE t = 0) AS user_ids,
                   list(v ORDER BY v) FILTER (WHERE t = 1) AS emails,
                   list(v ORDER BY v) FILTER (WHERE t = 2) AS phones,
                   list(v ORDER BY v) FILTER (WHERE t = 3) AS anonymous_ids
            FROM graph GROUP BY profile_id),
        e AS (
            SELECT profile_id, min("timestamp") AS first_seen, max("timestamp") AS last_seen,
                   count(*) AS event_count
            FROM resolved WHERE profile_id IS NOT NULL GROUP BY profile_id),
        known AS (
            SELECT profile_id, arg_max(traits, "timestamp") AS traits,
                   arg_max(json_extract_string(traits, '$.first_name'), "timestamp")
                       FILTER (WHERE json_extract_string(traits, '$.first_name') IS NOT NULL) AS first_name,
                   arg_max(json_extract_string(traits, '$.last_name'), "timestamp")
                       FILTER (WHERE json_extract_string(traits, '$.last_name') IS NOT NULL) AS last_name,
                   arg_max(json_extract_string(traits, '$.plan'), "timestamp")
                       FILTER (WHERE json_extract_string(traits, '$.plan') IS NOT NULL) AS plan
            FROM resolved WHERE type = 'identify' AND traits IS NOT NULL AND profile_id IS NOT NULL
            GROUP BY profile_id),
        campaign AS (
            SELECT profile_id, arg_min(src, ("timestamp", message_id)) AS first_source,
                   arg_max(src, ("timestamp", message_id)) AS last_source
            FROM (SELECT profile_id, "timestamp", message_id,
                         json_extract_string(context, '$.campaign.source') AS src FROM resolved)
            WHERE src IS NOT NULL GROUP BY profile_id),
        category AS (
            SELECT profile_id, mode(json_extract_string(properties, '$.category')) AS favourite_category
            FROM resolved WHERE event = 'Product Viewed' GROUP BY profile_id),
        orders AS (
            SELECT profile_id, count(*) AS orders_90d FROM resolved
            WHERE event = 'Order Completed' AND "timestamp" >= {as_of} - INTERVAL 90 DAY
            GROUP BY profile_id),
        revenue AS (
            SELECT profile_id, sum(r) AS revenue_total, avg(r) AS order_value_avg,
                   min(r) AS order_value_min, max(r) AS order_value_max
            FROM (SELECT profile_id, TRY_CAST(json_extract(properties, '$.revenue') AS DOUBLE) AS r
                  FROM resolved WHERE event = 'Order Completed')
            GROUP BY profile_id),
        viewed AS (
            SELECT profile_id, list_sort(list(DISTINCT p)) AS viewed_products_30d,
                   count(DISTINCT p) AS viewed_product_count_30d
            FROM (SELECT profile_id, json_extract_string(properties, '$.product_id') AS p FROM resolved
                  WHERE event = 'Product Viewed' AND "timestamp" >= {as_of} - INTERVAL 30 DAY)
            GROUP BY profile_id)
        SELECT l.profile_id, e.first_seen, e.last_seen, coalesce(e.event_count, 0) AS event_count,
               l.user_ids, l.emails, l.phones, l.anonymous_ids,
               k.traits, k.first_name, k.last_name, k.plan,
               c.first_source, c.last_source, g.favourite_category, o.orders_90d,
               r.revenue_total, r.order_value_avg, r.order_value_min, r.order_value_max,
               v.viewed_products_30d, v.viewed_product_count_30d
        FROM lists l
        LEFT JOIN e USING (profile_id) LEFT JOIN known k USING (profile_id)
        LEFT JOIN campaign c USING (profile_id) LEFT JOIN category g USING (profile_id)
        LEFT JOIN orders o USING (profile_id) LEFT JOIN revenue r USING (profile_id)
        LEFT JOIN viewed v USING (profile_id)
    """)
    copy("profiles", "profiles")
    stages.append(m.finish("profiles", events))

    # The five bundled segments.
    m = Meter(spill)
    segments = {
        "active_30d": f"SELECT profile_id, last_seen FROM profiles WHERE last_seen >= {as_of} - INTERVAL 30 DAY",
        "cart_abandoners": f"""
            WITH interested AS (
                SELECT profile_id, max("timestamp") AS last_interest FROM resolved
                WHERE event IN ('Product Viewed', 'Product Added')
                  AND "timestamp" >= {as_of} - INTERVAL 7 DAY AND profile_id IS NOT NULL
                GROUP BY profile_id),
            bought AS (
                SELECT DISTINCT profile_id FROM resolved
                WHERE event = 'Order Completed' AND "timestamp" >= {as_of} - INTERVAL 7 DAY)
            SELECT i.profile_id, i.last_interest FROM interested i
            LEFT JOIN bought b ON b.profile_id = i.profile_id WHERE b.profile_id IS NULL""",
        "high_value": "SELECT profile_id, revenue_total FROM profiles WHERE revenue_total >= 200",
        "lapsed_buyers": f"""
            SELECT profile_id, max("timestamp") AS last_order FROM resolved
            WHERE event = 'Order Completed' AND profile_id IS NOT NULL
            GROUP BY profile_id HAVING max("timestamp") < {as_of} - INTERVAL 21 DAY""",
    }
    for name, sql in segments.items():
        con.execute(f"CREATE TABLE seg_{name} AS {sql}")
    con.execute("""
        CREATE TABLE seg_high_value_active AS
        SELECT h.profile_id, h.revenue_total, a.last_seen FROM seg_high_value h
        JOIN seg_active_30d a ON a.profile_id = h.profile_id""")
    for name in list(segments) + ["high_value_active"]:
        copy(f"seg_{name}", f"segment_{name}")
    stages.append(m.finish("segments", events))

    con.close()
    summary = {
        "stages": stages,
        "events": events,
        "identifiers": identifiers,
        "profiles": count_profiles(os.path.join(out, "profiles.parquet")),
        "rounds": rounds,
    }
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(summary))


def count_profiles(path):
    return duckdb.connect().execute(f"SELECT count(*) FROM '{path}'").fetchone()[0]


if __name__ == "__main__":
    main()

"""The bundled project's pipeline in DuckDB SQL: the baseline `tessera bench` compares with.

Same input files, same stages, same outputs as `tessera run` on the bundled project:
checks and quarantine, one row per message_id, identity by connected components
(large-star / small-star rounds, the best-known way to do it in SQL), events with their
profile, sessions, RFM, the BG/NBD and Gamma-Gamma predictions, profiles with identifier
lists, last-known and computed traits, the eight segments and the three reports. Tables are
written as Parquet (Tessera writes Delta tables, which are Parquet plus a log).

How the pieces SQL has no function for are done, as a DuckDB user would do them:
- `funnel(...)`: one ASOF join per step (the latest reachable earlier step within the window),
  which reaches the same furthest step as Tessera's aggregate;
- the prediction models: the per-buyer summary in SQL, the maximum-likelihood fits and the
  per-buyer expectations in NumPy/SciPy (`scipy.optimize.minimize`, `scipy.special.hyp2f1`),
  the result read back into DuckDB; this needs `numpy` and `scipy` (benches/requirements.txt).

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
    parser.add_argument("--keep", action="store_true", help="keep the output Parquet files")
    args = parser.parse_args()
    try:
        import numpy  # noqa: F401
        import scipy  # noqa: F401
    except ImportError as e:
        raise SystemExit(f"the DuckDB baseline fits the prediction models with NumPy and SciPy ({e}): "
                         "pip install -r benches/requirements.txt into the Python it runs with")

    work = args.work
    shutil.rmtree(work, ignore_errors=True)
    out = os.path.join(work, "out")
    spill = os.path.join(work, "spill")
    os.makedirs(out)
    os.makedirs(spill)
    # An in-memory database, spilling to `spill`: a database file makes every intermediate
    # table a compressed write to disk, which roughly doubled the event stages here, and the
    # inputs fit in memory at the sizes the bench runs.
    con = duckdb.connect(":memory:")
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
    # One row per message_id through the row ids: grouping the ids alone is several times
    # cheaper than DISTINCT ON over whole rows. Exact redeliveries are identical, so which
    # copy stays does not matter.
    con.execute("""
        CREATE TABLE events AS
        SELECT * EXCLUDE (reason) FROM checked
        WHERE rowid IN (SELECT min(rowid) FROM checked WHERE reason IS NULL GROUP BY message_id)
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

    # Sessions, RFM and the prediction models (Tessera's journeys stage).
    m = Meter(spill)
    journeys(con, as_of, args.as_of)
    for table in ("sessions", "rfm", "predictions"):
        copy(table, table)
    stages.append(m.finish("journeys", events))

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
    segments["abandoned_checkout"] = f"""
        WITH f AS ({funnel_sql(f'"timestamp" >= {as_of} - INTERVAL 14 DAY')}),
        times AS (
            SELECT profile_id,
                   max("timestamp") FILTER (WHERE event = 'Checkout Started') AS last_checkout_at,
                   max("timestamp") FILTER (WHERE event = 'Order Completed') AS last_order_at
            FROM resolved
            WHERE profile_id IS NOT NULL AND "timestamp" >= {as_of} - INTERVAL 14 DAY
              AND event IN ('Checkout Started', 'Order Completed')
            GROUP BY profile_id)
        SELECT f.profile_id, t.last_checkout_at FROM f JOIN times t USING (profile_id)
        WHERE f.furthest_step = 3
          AND (t.last_order_at IS NULL OR t.last_order_at < t.last_checkout_at)"""
    segments["champions"] = "SELECT profile_id, rfm_score, monetary FROM rfm WHERE rfm_segment = 'Champions'"
    segments["valuable_at_risk"] = """
        WITH ranked AS (
            SELECT profile_id, churn_risk, clv, percent_rank() OVER (ORDER BY clv) AS clv_rank
            FROM predictions WHERE clv IS NOT NULL)
        SELECT profile_id, churn_risk, clv FROM ranked WHERE churn_risk > 0.5 AND clv_rank >= 0.75"""
    for name, sql in segments.items():
        con.execute(f"CREATE TABLE seg_{name} AS {sql}")
    con.execute("""
        CREATE TABLE seg_high_value_active AS
        SELECT h.profile_id, h.revenue_total, a.last_seen FROM seg_high_value h
        JOIN seg_active_30d a ON a.profile_id = h.profile_id""")
    for name in list(segments) + ["high_value_active"]:
        copy(f"seg_{name}", f"segment_{name}")
    stages.append(m.finish("segments", events))

    # The three bundled reports.
    m = Meter(spill)
    reports = {
        "after_add_to_cart": f"""
            WITH ordered AS (
                SELECT coalesce(event, type) AS action, "timestamp" AS at_time,
                       lead(coalesce(event, type)) OVER w AS next_action,
                       lead("timestamp") OVER w AS next_at
                FROM resolved
                WHERE profile_id IS NOT NULL AND "timestamp" >= {as_of} - INTERVAL 7 DAY
                WINDOW w AS (PARTITION BY profile_id ORDER BY "timestamp", message_id)),
            next_steps AS (
                SELECT CASE WHEN next_at IS NULL OR next_at - at_time > INTERVAL 30 MINUTE THEN '(left)'
                            ELSE next_action END AS next_action
                FROM ordered WHERE action = 'Product Added')
            SELECT next_action, count(*) AS times,
                   CAST(count(*) AS DOUBLE) / sum(count(*)) OVER () AS share
            FROM next_steps GROUP BY next_action ORDER BY times DESC, next_action LIMIT 10""",
        "checkout_funnel": f"""
            WITH journeys AS ({funnel_sql('TRUE')}),
            steps AS (
                SELECT s.step, s.name, count(j.profile_id) AS profiles
                FROM (VALUES (1, 'Product Viewed'), (2, 'Product Added'),
                             (3, 'Checkout Started'), (4, 'Order Completed')) AS s(step, name)
                LEFT JOIN journeys j ON j.furthest_step >= s.step
                GROUP BY s.step, s.name)
            SELECT step, name, profiles,
                   CAST(profiles AS DOUBLE) / nullif(lag(profiles) OVER (ORDER BY step), 0) AS from_previous_step,
                   CAST(profiles AS DOUBLE) / nullif(first_value(profiles) OVER (ORDER BY step), 0) AS from_first_step
            FROM steps ORDER BY step""",
        "rfm_overview": """
            SELECT rfm_segment, count(*) AS buyers, sum(monetary) AS revenue,
                   avg(recency_days) AS avg_recency_days, avg(frequency) AS avg_purchases
            FROM rfm GROUP BY rfm_segment ORDER BY revenue DESC""",
    }
    for name, sql in reports.items():
        con.execute(f"CREATE TABLE report_{name} AS {sql}")
        copy(f"report_{name}", f"report_{name}")
    stages.append(m.finish("reports", events))

    con.close()
    summary = {
        "stages": stages,
        "events": events,
        "identifiers": identifiers,
        "profiles": count_profiles(os.path.join(out, "profiles.parquet")),
        "rounds": rounds,
    }
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(summary))


FUNNEL_STEPS = ("Product Viewed", "Product Added", "Checkout Started", "Order Completed")


def funnel_sql(where, window="INTERVAL 3 DAY"):
    """Per profile, the furthest step of the bundled checkout funnel among the resolved events
    matching `where`: step k counts at an event no earlier than a reached step k-1 and at most
    `window` after the latest one, which one ASOF join per step finds."""
    names = ", ".join(f"'{n}'" for n in FUNNEL_STEPS)
    cases = " ".join(f"WHEN '{n}' THEN {i + 1}" for i, n in enumerate(FUNNEL_STEPS))
    parts = [
        f"""f AS (SELECT profile_id, "timestamp" AS t, CASE event {cases} END AS s FROM resolved
               WHERE profile_id IS NOT NULL AND event IN ({names}) AND ({where}))""",
        "r1 AS (SELECT profile_id, t FROM f WHERE s = 1)",
    ]
    for k in range(2, len(FUNNEL_STEPS) + 1):
        parts.append(
            f"""r{k} AS (SELECT e.profile_id, e.t FROM (SELECT * FROM f WHERE s = {k}) e
                   ASOF JOIN r{k - 1} p ON e.profile_id = p.profile_id AND e.t >= p.t
                   WHERE e.t - p.t <= {window})"""
        )
    reached = " UNION ALL ".join(
        f"SELECT profile_id, {k} AS k FROM r{k}" for k in range(1, len(FUNNEL_STEPS) + 1)
    )
    return (
        "WITH " + ", ".join(parts)
        + f" SELECT profile_id, max(k) AS furthest_step FROM ({reached}) GROUP BY profile_id"
    )


def journeys(con, as_of, as_of_text):
    """Sessions (30-minute gap), RFM scores and the BG/NBD + Gamma-Gamma predictions."""
    con.execute("""
        CREATE TABLE sessions AS
        WITH o AS (
            SELECT profile_id, "timestamp" AS ts, message_id, type, context, properties,
                   lag("timestamp") OVER (PARTITION BY profile_id ORDER BY "timestamp", message_id) AS prev
            FROM resolved WHERE profile_id IS NOT NULL),
        n AS (
            SELECT *, sum(CASE WHEN prev IS NULL OR ts - prev > INTERVAL 30 MINUTE THEN 1 ELSE 0 END)
                      OVER (PARTITION BY profile_id ORDER BY ts, message_id) AS session_index
            FROM o),
        s AS (
            SELECT profile_id, session_index, min(ts) AS started_at, max(ts) AS ended_at,
                   count(*) AS event_count, count(*) FILTER (WHERE type = 'page') AS page_views,
                   arg_min(context, (ts, message_id)) AS c, arg_min(properties, (ts, message_id)) AS p
            FROM n GROUP BY profile_id, session_index),
        f AS (
            SELECT *, coalesce(json_extract_string(c, '$.page.url'), json_extract_string(p, '$.url')) AS landing_page
            FROM s)
        SELECT substr(md5(profile_id || '|' || CAST(started_at AS VARCHAR)), 1, 20) AS session_id,
               profile_id, session_index, started_at, ended_at,
               CAST(epoch(ended_at - started_at) AS BIGINT) AS duration_seconds,
               event_count, page_views, landing_page,
               coalesce(json_extract_string(c, '$.page.referrer'), json_extract_string(p, '$.referrer')) AS referrer,
               coalesce(json_extract_string(c, '$.campaign.source'), json_extract_string(p, '$.utm_source'),
                        nullif(regexp_extract(landing_page, '[?&]utm_source=([^&#]*)', 1), '')) AS source,
               coalesce(json_extract_string(c, '$.campaign.medium'), json_extract_string(p, '$.utm_medium'),
                        nullif(regexp_extract(landing_page, '[?&]utm_medium=([^&#]*)', 1), '')) AS medium,
               coalesce(json_extract_string(c, '$.campaign.name'), json_extract_string(p, '$.utm_campaign'),
                        nullif(regexp_extract(landing_page, '[?&]utm_campaign=([^&#]*)', 1), '')) AS campaign,
               30 AS gap_minutes
        FROM f
    """)
    con.execute(f"""
        CREATE TABLE purchases AS
        SELECT profile_id, "timestamp", TRY_CAST(json_extract(properties, '$.revenue') AS DOUBLE) AS value
        FROM resolved
        WHERE event = 'Order Completed' AND profile_id IS NOT NULL AND "timestamp" <= {as_of}
    """)
    con.execute(f"""
        CREATE TABLE rfm AS
        WITH b AS (
            SELECT profile_id, min("timestamp") AS first_purchase_at, max("timestamp") AS last_purchase_at,
                   epoch({as_of} - max("timestamp")) / 86400.0 AS recency_days,
                   count(*) AS frequency, coalesce(sum(value), 0) AS monetary,
                   avg(value) AS average_order_value
            FROM purchases GROUP BY profile_id),
        s AS (
            SELECT *, least(5, 1 + floor(5 * percent_rank() OVER (ORDER BY recency_days DESC)))::INT AS r_score,
                      least(5, 1 + floor(5 * percent_rank() OVER (ORDER BY frequency)))::INT AS f_score,
                      least(5, 1 + floor(5 * percent_rank() OVER (ORDER BY monetary)))::INT AS m_score
            FROM b)
        SELECT *, r_score::VARCHAR || f_score::VARCHAR || m_score::VARCHAR AS rfm_score,
               CASE WHEN r_score = 5 AND f_score = 1 THEN 'New Customers'
                    WHEN r_score = 5 AND f_score <= 3 THEN 'Potential Loyalists'
                    WHEN r_score = 5 THEN 'Champions'
                    WHEN r_score = 4 AND f_score = 1 THEN 'Promising'
                    WHEN r_score = 4 AND f_score <= 3 THEN 'Potential Loyalists'
                    WHEN r_score = 4 THEN 'Loyal Customers'
                    WHEN r_score = 3 AND f_score <= 2 THEN 'About to Sleep'
                    WHEN r_score = 3 AND f_score = 3 THEN 'Need Attention'
                    WHEN r_score = 3 THEN 'Loyal Customers'
                    WHEN f_score <= 2 THEN 'Hibernating'
                    WHEN f_score <= 4 THEN 'At Risk'
                    ELSE 'Cannot Lose Them' END AS rfm_segment
        FROM s
    """)
    # The buy-till-you-die summary: purchases on one UTC day are one transaction.
    week = 7 * 86400.0
    con.execute(f"""
        CREATE TABLE buyers AS
        WITH days AS (
            SELECT profile_id, date_trunc('day', "timestamp") AS day, sum(value) AS value
            FROM purchases GROUP BY ALL),
        b AS (
            SELECT profile_id, count(*) AS days, min(day) AS first_day, max(day) AS last_day,
                   sum(value) AS total, count(value) AS valued, arg_min(value, day) AS first_value
            FROM days GROUP BY profile_id)
        SELECT profile_id, (days - 1)::DOUBLE AS x,
               epoch(last_day - first_day) / {week} AS t_x,
               epoch({as_of} - first_day) / {week} AS big_t,
               CASE WHEN days > 1 AND valued - (first_value IS NOT NULL)::INT > 0
                    THEN (total - coalesce(first_value, 0)) / (valued - (first_value IS NOT NULL)::INT) END AS m
        FROM b ORDER BY profile_id
    """)
    import numpy as np
    from scipy.optimize import minimize
    from scipy.special import gammaln, hyp2f1

    ids, x, t_x, big_t, m = con.execute(
        "SELECT profile_id, x, t_x, big_t, m FROM buyers"
    ).fetchnumpy().values()
    x = np.asarray(x, dtype=float)
    t_x = np.asarray(t_x, dtype=float)
    big_t = np.asarray(big_t, dtype=float)
    m = np.ma.filled(np.ma.asarray(m, dtype=float), np.nan)

    # BG/NBD by maximum likelihood over the distinct summaries, weighted by their counts.
    fit_rows = big_t > 0
    keys, counts = np.unique(np.stack([x[fit_rows], t_x[fit_rows], big_t[fit_rows]]), axis=1, return_counts=True)
    fx, ftx, fT = keys

    def bgnbd_nll(log_params):
        r, alpha, a, b = np.exp(log_params)
        a1 = gammaln(r + fx) - gammaln(r) + r * np.log(alpha)
        a2 = gammaln(a + b) + gammaln(b + fx) - gammaln(b) - gammaln(a + b + fx)
        a3 = -(r + fx) * np.log(alpha + fT)
        a4 = np.where(fx > 0, np.log(a) - np.log(np.maximum(b + fx - 1, 1e-300)) - (r + fx) * np.log(alpha + ftx), -np.inf)
        return -np.sum(counts * (a1 + a2 + np.logaddexp(a3, a4)))

    bg = minimize(bgnbd_nll, np.zeros(4), method="L-BFGS-B", bounds=[(-13.8, 13.8)] * 4)
    r, alpha, a, b = np.exp(bg.x)

    def expected(t):
        z = t / (alpha + big_t + t)
        head = (a + b + x - 1) / (a - 1)
        tail = 1 - ((alpha + big_t) / (alpha + big_t + t)) ** (r + x) * hyp2f1(r + x, b + x, a + b + x - 1, z)
        return head * tail / (1 + (x > 0) * a / (b + x - 1) * ((alpha + big_t) / (alpha + t_x)) ** (r + x))

    p_alive = 1 / (1 + (x > 0) * a / np.maximum(b + x - 1, 1e-300) * ((alpha + big_t) / (alpha + t_x)) ** (r + x))

    # Gamma-Gamma on the repeat buyers with a positive mean spend.
    gg_rows = (x > 0) & np.isfinite(m) & (m > 0)
    gx, gm = x[gg_rows], m[gg_rows]

    def gg_nll(log_params):
        p, q, v = np.exp(log_params)
        return -np.sum(
            gammaln(p * gx + q) - gammaln(p * gx) - gammaln(q) + q * np.log(v)
            + (p * gx - 1) * np.log(gm) + p * gx * np.log(gx) - (p * gx + q) * np.log(gx * gm + v)
        )

    gg = minimize(gg_nll, np.zeros(3), method="L-BFGS-B", bounds=[(-13.8, 13.8)] * 3)
    p, q, v = np.exp(gg.x)
    spend = np.where(gg_rows, (v + np.nan_to_num(m) * x) * p / (p * x + q - 1), p * v / (q - 1))
    clv = np.zeros_like(x)
    before = np.zeros_like(x)
    for month in range(1, 13):
        now = expected(month * 30 / 7)
        clv += (now - before) * spend / (1.01 ** month)
        before = now
    import pyarrow as pa

    predictions = pa.table({
        "profile_id": ids, "frequency": x, "recency": t_x, "age": big_t,
        "monetary_value": np.where(np.isfinite(m), m, None),
        "expected_purchases_30d": expected(30 / 7), "expected_purchases_90d": expected(90 / 7),
        "expected_purchases_365d": expected(365 / 7), "p_alive": p_alive, "churn_risk": 1 - p_alive,
        "expected_spend": spend, "clv": clv,
    })
    con.register("predictions_arrow", predictions)
    con.execute("CREATE TABLE predictions AS SELECT * FROM predictions_arrow")
    con.unregister("predictions_arrow")


def count_profiles(path):
    return duckdb.connect().execute(f"SELECT count(*) FROM '{path}'").fetchone()[0]


if __name__ == "__main__":
    main()

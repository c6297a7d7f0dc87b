//! `tessera serve` as a BI tool uses it: the ADBC Flight SQL driver lists the tables, runs
//! queries, needs the token, and sees a new run's rows once that run is published.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdout, Command, Stdio};

use crate::common::*;

/// A child process killed when the test ends, however it ends.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Three people, each with their own user id and device: three profiles.
fn person(id: &'static str, user: &'static str, anon: &'static str, day: i64) -> Ev {
    Ev {
        anonymous_id: Some(anon),
        ..Ev::track(id, 1_790_000_000_000_000 + day * 86_400_000_000).with_user(user)
    }
}

/// Starts `tessera serve` on a free port; returns the process and its grpc:// address.
fn start_server(p: &TempProject, token: &str) -> (Killed, String) {
    let mut child = p
        .cmd(&[
            "serve",
            "--bind",
            "127.0.0.1:0",
            "--token",
            token,
            "--quiet",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("tessera serve starts");
    let stdout = child.stdout.take().expect("piped stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("serve prints its address");
    let address = line
        .trim()
        .rsplit(' ')
        .next()
        .unwrap_or_default()
        .to_string();
    assert!(address.starts_with("grpc://127.0.0.1:"), "{line}");
    (Killed(child), address)
}

/// The BI session: one connection kept open across a publish. It prints a JSON line per step
/// and waits for a line on stdin between the two.
const CLIENT: &str = r#"
import json, sys
import adbc_driver_flightsql.dbapi as flight_sql
from adbc_driver_flightsql import DatabaseOptions

uri, token = sys.argv[1], sys.argv[2]

def refused(headers):
    try:
        with flight_sql.connect(uri, db_kwargs=headers) as conn:
            cur = conn.cursor()
            cur.execute("SELECT 1")
            cur.fetchall()
        return None
    except Exception as e:
        return str(e)

bad = {DatabaseOptions.AUTHORIZATION_HEADER.value: "Bearer wrong-" + token}
print(json.dumps({"no_token": refused({}), "wrong_token": refused(bad)}), flush=True)

conn = flight_sql.connect(uri, db_kwargs={DatabaseOptions.AUTHORIZATION_HEADER.value: "Bearer " + token})
cur = conn.cursor()

def step():
    tables = {}
    for catalog in conn.adbc_get_objects(depth="tables").read_all().to_pylist():
        for schema in catalog["catalog_db_schemas"]:
            tables[schema["db_schema_name"]] = sorted(t["table_name"] for t in schema["db_schema_tables"])
    cur.execute("SELECT user_ids FROM profiles ORDER BY event_count, profile_id")
    users = sorted(u for row in cur.fetchall() for u in row[0])
    cur.execute("SELECT count(*) FROM segments.buyers")
    (buyers,) = cur.fetchone()
    try:
        cur.execute("DELETE FROM profiles")
        write = None
    except Exception as e:
        write = str(e)
    schema = conn.adbc_get_table_schema("profiles", db_schema_filter="public")
    return {"tables": tables, "users": users, "buyers": buyers, "write": write,
            "profile_columns": schema.names}

print(json.dumps(step()), flush=True)
sys.stdin.readline()
print(json.dumps(step()), flush=True)
"#;

fn json_line(out: &mut BufReader<ChildStdout>) -> serde_json::Value {
    let mut line = String::new();
    out.read_line(&mut line).expect("the client prints a line");
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("client printed ({e}): {line:?}"))
}

#[test]
fn a_bi_tool_lists_queries_and_sees_the_next_published_run() {
    let Some(python) = python("serve::a_bi_tool_lists_queries_and_sees_the_next_published_run")
    else {
        return;
    };
    let p = TempProject::local();
    std::fs::create_dir_all(p.path().join("queries/segments")).unwrap();
    std::fs::write(
        p.path().join("queries/segments/buyers.sql"),
        "SELECT DISTINCT profile_id FROM events WHERE user_id IN ('u2', 'u3')\n",
    )
    .unwrap();
    write_parquet(
        &p.events().join("day1.parquet"),
        &[events_batch(&[
            person("m1", "u1", "a1", 0),
            person("m2", "u2", "a2", 0),
        ])],
    );
    p.run_json();
    let token = "t0ken-for-tests";
    let (_server, address) = start_server(&p, token);
    let mut client = Killed(
        Command::new(&python)
            .args(["-c", CLIENT, &address, token])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python starts"),
    );
    let mut out = BufReader::new(client.0.stdout.take().unwrap());

    let auth = json_line(&mut out);
    for case in ["no_token", "wrong_token"] {
        let message = auth[case]
            .as_str()
            .unwrap_or_else(|| panic!("{case}: {auth}"));
        assert!(
            message.contains("Unauthenticated") || message.contains("UNAUTHENTICATED"),
            "{case}: {message}"
        );
        assert!(message.contains("Bearer"), "{case}: {message}");
    }

    let first = json_line(&mut out);
    assert_eq!(first["users"], serde_json::json!(["u1", "u2"]), "{first}");
    assert_eq!(first["buyers"], 1, "{first}");
    let public = first["tables"]["public"].as_array().unwrap();
    for table in ["profiles", "identity_graph", "runs", "events"] {
        assert!(public.contains(&table.into()), "{table} listed: {first}");
    }
    assert!(
        !public.iter().any(|t| t.as_str().unwrap().starts_with('_')),
        "no bookkeeping tables: {first}"
    );
    assert_eq!(first["tables"]["segments"], serde_json::json!(["buyers"]));
    assert!(
        first["write"].as_str().unwrap().contains("not allowed"),
        "writes refused: {first}"
    );
    assert!(
        first["profile_columns"]
            .as_array()
            .unwrap()
            .contains(&"profile_id".into()),
        "{first}"
    );

    // A new run is published while the connection stays open.
    write_parquet(
        &p.events().join("day2.parquet"),
        &[events_batch(&[person("m3", "u3", "a3", 1)])],
    );
    p.run_json();
    client
        .0
        .stdin
        .as_mut()
        .unwrap()
        .write_all(b"next\n")
        .unwrap();
    let second = json_line(&mut out);
    assert_eq!(
        second["users"],
        serde_json::json!(["u1", "u2", "u3"]),
        "{second}"
    );
    assert_eq!(second["buyers"], 2, "{second}");
}

#[test]
fn serving_beyond_loopback_without_a_token_is_refused() {
    let p = TempProject::local();
    let out = run(p
        .cmd(&["serve", "--bind", "0.0.0.0:0"])
        .env_remove("TESSERA_SERVE_TOKEN"));
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let message = stderr(&out);
    assert!(message.contains("--token"), "{message}");
    assert!(message.contains("0.0.0.0:0"), "{message}");
}

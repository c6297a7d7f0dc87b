//! A real cluster: a scheduler and two executors, each the `tessera` binary in its own process on
//! 127.0.0.1, driven by `tessera run --cluster`; its tables are compared with a local run's.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

/// A port nothing listens on, and the one after it free too (an executor takes both).
fn free_ports() -> u16 {
    loop {
        let first = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = first.local_addr().unwrap().port();
        if port < u16::MAX && TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return port;
        }
    }
}

fn wait_listening(port: u16, what: &str, child: &mut Child) {
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited ({status}) before listening");
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{what} is not listening on {port}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The cluster's processes; killed when dropped.
struct Cluster {
    address: String,
    scheduler: Child,
    executors: Vec<Child>,
    work_dirs: Vec<PathBuf>,
    _dir: tempfile::TempDir,
}

impl Cluster {
    fn start(executors: usize) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let port = free_ports();
        let logs = dir.path().to_path_buf();
        let log = move |name: &str| std::fs::File::create(logs.join(name)).unwrap();
        let mut scheduler = tessera()
            .args(["cluster", "scheduler", "--bind"])
            .arg(format!("127.0.0.1:{port}"))
            .args(["--executor-timeout", "6"])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log("scheduler.log"))
            .spawn()
            .expect("the scheduler starts");
        wait_listening(port, "the scheduler", &mut scheduler);
        let mut cluster = Cluster {
            address: format!("df://127.0.0.1:{port}"),
            scheduler,
            executors: Vec::new(),
            work_dirs: Vec::new(),
            _dir: dir,
        };
        for n in 0..executors {
            let bind = free_ports();
            let work = cluster._dir.path().join(format!("executor-{n}"));
            std::fs::create_dir_all(&work).unwrap();
            let mut child = tessera()
                .args(["cluster", "executor", "--scheduler"])
                .arg(format!("127.0.0.1:{port}"))
                .arg("--bind")
                .arg(format!("127.0.0.1:{bind}"))
                .args(["--tasks", "2", "--memory-limit", "1GiB", "--work-dir"])
                .arg(&work)
                .env("RUST_LOG", "info")
                .stdout(Stdio::null())
                .stderr(log(&format!("executor-{n}.log")))
                .spawn()
                .expect("an executor starts");
            wait_listening(bind, "an executor", &mut child);
            cluster.executors.push(child);
            cluster.work_dirs.push(work);
        }
        cluster
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self._dir.path().join(name)).unwrap_or_default()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for child in self.executors.iter_mut().chain([&mut self.scheduler]) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A project over `people` generated people with the bundled config and queries, and a
/// shared scratch folder (`run.spill_dir`) for the cluster's executors.
fn project(people: u64, seed: u64) -> TempProject {
    let p = with_scratch(TempProject::new(
        &std::fs::read_to_string(repo().join("tessera.toml")).unwrap(),
    ));
    generate(&p.path().join("data"), people, 4, seed);
    copy_dir(&repo().join("queries"), &p.path().join("queries"));
    p
}

/// `p` with a `[run] spill_dir` of its own (an absolute path: a relative one is taken from
/// the working folder).
fn with_scratch(p: TempProject) -> TempProject {
    let scratch = p.path().join("scratch");
    append_to_config(
        &p,
        &format!("\n[run]\nspill_dir = \"{}\"\n", scratch.display()),
    );
    p
}

/// Adds `lines` at the end of `p`'s tessera.toml (after [`with_scratch`], into `[run]`).
fn append_to_config(p: &TempProject, lines: &str) {
    let config = p.path().join("tessera.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("{text}{lines}")).unwrap();
}

/// The same project in a second folder.
fn copy_of(p: &TempProject) -> TempProject {
    let config = std::fs::read_to_string(repo().join("tessera.toml")).unwrap();
    let q = with_scratch(TempProject::new(&config));
    copy_dir(&p.path().join("data"), &q.path().join("data"));
    copy_dir(&p.path().join("queries"), &q.path().join("queries"));
    q
}

/// A few days after the generated events (from 2026-10-01), so windows and RFM see them.
const AS_OF: &str = "2026-10-08T00:00:00Z";

fn local_run(p: &TempProject) -> serde_json::Value {
    let text = ok(run(
        &mut p.cmd(&["run", "--json", "--quiet", "--as-of", AS_OF])
    ));
    serde_json::from_str(text.trim()).unwrap()
}

/// `tessera run --cluster` with info logs (JSON) on stderr: the report and the log.
fn cluster_run(p: &TempProject, cluster: &Cluster) -> (serde_json::Value, String) {
    let out = run(&mut p.cmd(&[
        "run",
        "--json",
        "-v",
        "--as-of",
        AS_OF,
        "--cluster",
        &cluster.address,
    ]));
    let log = stderr(&out);
    let text = ok(out);
    (serde_json::from_str(text.trim()).unwrap(), log)
}

/// How many queries the run's log says went to the cluster.
fn sent_to_cluster(log: &str) -> u64 {
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find_map(|l| l["fields"]["on_cluster"].as_u64())
        .unwrap_or_else(|| panic!("no `on_cluster` count in the log:\n{log}"))
}

fn table_text(p: &TempProject, sql: &str) -> String {
    let rows = p.query(sql);
    let mut lines: Vec<String> = rows.iter().map(|r| r.to_string()).collect();
    lines.sort();
    lines.join("\n")
}

/// Every output table (and the segments folder) of `a` and `b` holds the same rows.
fn assert_same_tables(a: &TempProject, b: &TempProject) {
    for sql in [
        "SELECT * FROM events",
        "SELECT * FROM identity_graph",
        "SELECT * FROM identity_links",
        "SELECT * FROM identity_conflicts",
        "SELECT * FROM profiles",
        "SELECT * FROM sessions",
        "SELECT * FROM rfm",
        // The file a rejected row came from is in each project's own folder.
        "SELECT * EXCLUDE (source_file), regexp_replace(source_file, '^.*/data/events/', '') AS file FROM rejected_events",
        "SELECT * FROM segments.high_value",
        "SELECT * FROM segments.active_30d",
        "SELECT * FROM reports.checkout_funnel",
        "SELECT * FROM reports.after_add_to_cart",
    ] {
        let (x, y) = (table_text(a, sql), table_text(b, sql));
        assert!(!x.is_empty() || sql.contains("rejected"), "{sql}: no rows");
        assert!(x == y, "{sql}: the cluster run differs from the local run");
    }
}

fn same_run(a: &serde_json::Value, b: &serde_json::Value) {
    for key in [
        "rows_read",
        "rows_rejected",
        "rows_duplicate",
        "events",
        "identity",
    ] {
        assert_eq!(a[key], b[key], "{key}");
    }
}

#[test]
fn a_run_on_a_cluster_gives_the_same_tables_as_a_local_run() {
    let local = project(120, 7);
    let remote = copy_of(&local);
    // Planned into 3 partitions on the cluster, not this machine's core count.
    append_to_config(&remote, "cluster_partitions = 3\n");
    let cluster = Cluster::start(2);
    let a = local_run(&local);
    let (b, log) = cluster_run(&remote, &cluster);
    same_run(&a, &b);
    let scheduler = cluster.log("scheduler.log");
    // `Hash([keys], partitions)` in the plans the scheduler logs.
    let counts: Vec<String> = scheduler
        .split("Hash([")
        .skip(1)
        .map(|rest| {
            let after = rest.split_once("], ").map_or("", |(_, after)| after);
            after.chars().take_while(char::is_ascii_digit).collect()
        })
        .collect();
    assert!(
        !counts.is_empty(),
        "no hash shuffle in the jobs:\n{scheduler}"
    );
    assert!(
        counts.iter().all(|n| n == "3"),
        "jobs not planned into 3 partitions: {counts:?}"
    );
    // Not a run that quietly did everything on the driver.
    assert!(sent_to_cluster(&log) > 0, "{log}");
    assert_same_tables(&local, &remote);
    // The executors ran the tasks (each asks the scheduler for work when it has a free slot).
    let tasks: Vec<usize> = (0..2)
        .map(|n| {
            cluster
                .log(&format!("executor-{n}.log"))
                .matches("Received task")
                .count()
        })
        .collect();
    eprintln!("tasks run by each executor: {tasks:?}");
    assert!(tasks.iter().sum::<usize>() > 0, "no executor ran a task");
}

#[test]
fn a_run_needs_a_reachable_scheduler_and_a_shared_scratch_folder() {
    let p = project(20, 3);
    let port = free_ports();
    let out = run(&mut p.cmd(&["run", "--cluster", &format!("df://127.0.0.1:{port}")]));
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let text = stderr(&out);
    assert!(
        text.contains(&format!("df://127.0.0.1:{port}"))
            && text.contains("tessera cluster scheduler"),
        "{text}"
    );
    assert!(!p.path().join("out/runs").exists(), "nothing written");

    append_to_config(&p, "cluster_partitions = 0\n");
    let out = run(&mut p.cmd(&["run", "--cluster", &format!("df://127.0.0.1:{port}")]));
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("run.cluster_partitions"),
        "{}",
        stderr(&out)
    );

    let q = TempProject::local();
    let out = run(&mut q.cmd(&["run", "--cluster", "df://127.0.0.1:1"]));
    assert!(stderr(&out).contains("run.spill_dir"), "{}", stderr(&out));
    let out = run(&mut q.cmd(&["run", "--cluster", "http://x:1"]));
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("df://HOST:PORT"), "{}", stderr(&out));
}

/// Files anywhere under `dir`.
fn any_file(dir: &Path) -> bool {
    walk(dir).next().is_some()
}

fn walk(dir: &Path) -> impl Iterator<Item = PathBuf> {
    let mut stack = vec![dir.to_path_buf()];
    let mut files = Vec::new();
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                files.push(path);
            }
        }
    }
    files.into_iter()
}

/// `tessera run --cluster` started in the background (`verbosity`: `-v` or `--quiet`), its
/// output piped.
fn spawn_cluster_run(p: &TempProject, cluster: &Cluster, verbosity: &str) -> Child {
    p.cmd(&[
        "run",
        "--json",
        verbosity,
        "--as-of",
        AS_OF,
        "--cluster",
        &cluster.address,
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap()
}

/// The output of the run `child` and its stdout and stderr as one text, once it ends; it fails
/// the test if the run has not ended within `limit` (`when`: since what, for the message).
fn ended_within(mut child: Child, limit: Duration, when: &str) -> (Output, String) {
    let since = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if since.elapsed() > limit {
            let _ = child.kill();
            panic!("the run still waits {} s {when}", limit.as_secs());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().unwrap();
    let text = format!("{}{}", stdout(&out), stderr(&out));
    (out, text)
}

/// Waits until the executor working in `work_dir` holds shuffle output of a running job.
fn wait_for_task(work_dir: &Path) {
    let start = Instant::now();
    while !any_file(work_dir) {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "the executor got no task"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// An executor is killed once it holds shuffle output of the run, after a delay drawn at
/// random (printed; `TESSERA_KILL_DELAY_MS` repeats one), so that runs of the suite kill it
/// at different points: running a stage, holding output a later stage needs, or holding a
/// finished query's results. Before the cluster's fixes, half the runs with no delay failed
/// or hung: Ballista's adaptive planner and its push scheduling lost the work to run again,
/// and the driver's fetch of a finished query's results from the dead executor was refused.
#[test]
fn an_executor_killed_mid_run_costs_a_retry_not_a_wrong_table() {
    let delay = std::env::var("TESSERA_KILL_DELAY_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos() as u64
                % 1000
        });
    eprintln!("the executor is killed {delay} ms after its first shuffle file (TESSERA_KILL_DELAY_MS={delay} repeats it)");
    let local = project(400, 11);
    let remote = copy_of(&local);
    let mut cluster = Cluster::start(2);
    let a = local_run(&local);
    let mut child = spawn_cluster_run(&remote, &cluster, "-v");
    wait_for_task(&cluster.work_dirs[0]);
    std::thread::sleep(Duration::from_millis(delay));
    cluster.executors[0].kill().unwrap();
    cluster.executors[0].wait().unwrap();
    assert!(
        child.try_wait().unwrap().is_none(),
        "the run ended before the executor was killed"
    );
    let out = child.wait_with_output().unwrap();
    let log = stderr(&out);
    assert!(out.status.success(), "the run failed:\n{log}");
    // The scheduler notices the loss (Ballista 55's words) within its executor timeout (6 s),
    // if the run did not end first.
    let ended = Instant::now();
    while !cluster.log("scheduler.log").contains("Removing executor") {
        assert!(
            ended.elapsed() < Duration::from_secs(30),
            "the scheduler did not notice the killed executor:\n{}",
            cluster.log("scheduler.log")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let b: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    same_run(&a, &b);
    assert_same_tables(&local, &remote);
}

/// A scheduler with no executor takes jobs and holds them: the run must not wait for ever.
/// `run.query_timeout` bounds each job sent to the cluster, as it bounds the queries of a
/// local run, and the error says what to check.
#[test]
fn a_run_on_a_cluster_without_executors_ends_at_the_query_time_limit() {
    let p = project(30, 4);
    append_to_config(&p, "query_timeout = \"3s\"\n");
    let cluster = Cluster::start(0);
    let child = spawn_cluster_run(&p, &cluster, "--quiet");
    let (out, text) = ended_within(
        child,
        Duration::from_secs(120),
        "after it started, with a 3 s query time limit",
    );
    assert!(
        !out.status.success(),
        "the run succeeded with no executor:\n{text}"
    );
    assert!(
        text.contains("run.query_timeout") && text.contains("tessera cluster executor"),
        "the error does not say what to check:\n{text}"
    );
    let published = run(&mut p.cmd(&["query", "SELECT count(*) AS n FROM profiles", "--quiet"]));
    assert!(
        !published.status.success(),
        "a failed run published profiles"
    );
}

#[test]
fn a_run_on_a_cluster_over_s3_gives_the_same_tables_as_a_local_run() {
    if !s3_available("a_run_on_a_cluster_over_s3_gives_the_same_tables_as_a_local_run") {
        return;
    }
    let local = project(120, 5);
    let prefix = s3_prefix();
    ok(run(tessera().args([
        "generate",
        "--out",
        &format!("{prefix}/data"),
        "--people",
        "120",
        "--days",
        "4",
        "--seed",
        "5",
        "--quiet",
    ])));
    let bundled = std::fs::read_to_string(repo().join("tessera.toml")).unwrap();
    let config = bundled
        .replace(
            "events = \"data/events\"",
            &format!("events = \"{prefix}/data/events\""),
        )
        .replace("output = \"out\"", &format!("output = \"{prefix}/out\""));
    assert!(
        config.contains(&format!("{prefix}/out")),
        "the bundled config moved"
    );
    let remote = with_scratch(TempProject::new(&config));
    copy_dir(&repo().join("queries"), &remote.path().join("queries"));
    let cluster = Cluster::start(2);
    let a = local_run(&local);
    let (b, log) = cluster_run(&remote, &cluster);
    same_run(&a, &b);
    assert!(sent_to_cluster(&log) > 0, "{log}");
    assert_same_tables(&local, &remote);
}

/// The scheduler dies while a run's job is on the cluster: Ballista keeps job state in the
/// scheduler's memory, so the job is lost. The run must end (not wait for ever) with an error
/// naming the cluster, publish nothing, and a rerun on a new scheduler must give the local
/// run's tables.
#[test]
fn a_scheduler_killed_mid_run_fails_the_run_and_publishes_nothing() {
    let local = project(400, 12);
    let remote = copy_of(&local);
    let mut cluster = Cluster::start(1);
    let child = spawn_cluster_run(&remote, &cluster, "--quiet");
    wait_for_task(&cluster.work_dirs[0]);
    cluster.scheduler.kill().unwrap();
    cluster.scheduler.wait().unwrap();
    let (out, text) = ended_within(child, Duration::from_secs(180), "after its scheduler died");
    assert!(
        !out.status.success(),
        "the run succeeded without its scheduler:\n{text}"
    );
    assert!(
        text.contains("cluster") || text.contains("scheduler"),
        "the error does not say the cluster failed:\n{text}"
    );
    let published =
        run(&mut remote.cmd(&["query", "SELECT count(*) AS n FROM profiles", "--quiet"]));
    assert!(
        !published.status.success(),
        "a failed first run published profiles: {}",
        stdout(&published)
    );
    drop(cluster);

    let cluster = Cluster::start(1);
    local_run(&local);
    cluster_run(&remote, &cluster);
    assert_same_tables(&local, &remote);
}

/// Identity past `run.cluster_identity_above` on a cluster: the rounds' queries run on the
/// executors and the identity tables are a local union-find run's.
#[test]
fn identity_rounds_on_a_cluster_give_the_local_runs_tables() {
    use crate::identity_rounds::{adversarial_identity_project, assert_same_identity, rounds_line};
    let local = adversarial_identity_project(300, 32, "");
    let remote = adversarial_identity_project(300, 32, "cluster_identity_above = 50");
    let cluster = Cluster::start(2);
    local.run_json();
    let out = run(&mut remote.cmd(&["run", "--json", "-vv", "--cluster", &cluster.address]));
    let log = stderr(&out);
    ok(out);
    let line = rounds_line(&log).unwrap_or_else(|| panic!("the rounds did not run:\n{log}"));
    assert!(line["fields"]["rounds"].as_u64().unwrap() > 1, "{line}");
    // The rounds' queries over the scratch folder's edges went to the executors, and so did
    // the copies that write each round's edges for the next (executors writing Parquet).
    let sent: Vec<String> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| l["fields"]["message"] == "query sent to the cluster")
        .filter_map(|l| l["fields"]["plan"].as_str().map(str::to_string))
        .filter(|p| p.contains("identity_rounds_"))
        .collect();
    let copies = sent.iter().filter(|p| p.starts_with("CopyTo")).count();
    assert!(
        copies >= 4 && sent.len() > copies,
        "the rounds did not run on the cluster:\n{sent:#?}"
    );
    assert_same_identity(
        &local,
        &remote,
        "the cluster's rounds differ from the local union-find",
    );
}

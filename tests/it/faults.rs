//! A fault-injecting TCP proxy between tessera and the S3 server: 503 SlowDown answers,
//! connection resets, stalls longer than the request timeout, and connections cut part way
//! through a response. Runs through it must complete with the right tables, or fail leaving
//! nothing half published (a publish that had begun is finished by the next run).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::common::*;
use crate::reliability::{differing, fingerprints, project, run_args};

/// What the proxy did, by kind.
#[derive(Default, Debug)]
pub struct Injected {
    pub connections: AtomicU64,
    pub slow_down: AtomicU64,
    pub resets: AtomicU64,
    pub stalls: AtomicU64,
    pub cuts: AtomicU64,
}

impl Injected {
    fn faults(&self) -> u64 {
        self.slow_down.load(Ordering::Relaxed)
            + self.resets.load(Ordering::Relaxed)
            + self.stalls.load(Ordering::Relaxed)
            + self.cuts.load(Ordering::Relaxed)
    }
}

#[derive(Clone, Copy)]
enum Fault {
    None,
    SlowDown,
    Reset,
    Stall,
    /// Forward, then drop both sides after this many bytes of response.
    Cut(usize),
}

/// A proxy on 127.0.0.1 forwarding to `upstream`, with faults drawn per connection.
pub struct Proxy {
    pub addr: SocketAddr,
    pub injected: Arc<Injected>,
    _runtime: tokio::runtime::Runtime,
}

const SLOW_DOWN: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>";

impl Proxy {
    pub fn start(upstream: SocketAddr, seed: u64) -> Proxy {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let listener = runtime.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = listener.local_addr().unwrap();
        let injected = Arc::new(Injected::default());
        let stats = injected.clone();
        runtime.spawn(async move {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                stats.connections.fetch_add(1, Ordering::Relaxed);
                let draw: f64 = rng.gen();
                let fault = if draw < 0.10 {
                    Fault::SlowDown
                } else if draw < 0.15 {
                    Fault::Reset
                } else if draw < 0.16 {
                    Fault::Stall
                } else if draw < 0.26 {
                    Fault::Cut(rng.gen_range(50..4_000))
                } else {
                    Fault::None
                };
                tokio::spawn(handle(client, upstream, fault, stats.clone()));
            }
        });
        Proxy {
            addr,
            injected,
            _runtime: runtime,
        }
    }
}

async fn first_bytes(client: &mut TcpStream) {
    let mut buf = vec![0u8; 16 * 1024];
    let _ = tokio::time::timeout(Duration::from_millis(500), client.read(&mut buf)).await;
}

async fn handle(mut client: TcpStream, upstream: SocketAddr, fault: Fault, stats: Arc<Injected>) {
    match fault {
        Fault::SlowDown => {
            first_bytes(&mut client).await;
            stats.slow_down.fetch_add(1, Ordering::Relaxed);
            let reply = format!(
                "HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{SLOW_DOWN}",
                SLOW_DOWN.len()
            );
            let _ = client.write_all(reply.as_bytes()).await;
            let _ = client.shutdown().await;
        }
        Fault::Reset => {
            first_bytes(&mut client).await;
            stats.resets.fetch_add(1, Ordering::Relaxed);
            let _ = client.set_zero_linger(); // dropping now sends RST
        }
        Fault::Stall => {
            first_bytes(&mut client).await;
            stats.stalls.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_secs(4)).await;
        }
        Fault::None | Fault::Cut(_) => {
            let Ok(server) = TcpStream::connect(upstream).await else {
                return;
            };
            let (mut client_read, mut client_write) = client.into_split();
            let (mut server_read, mut server_write) = server.into_split();
            let up = tokio::spawn(async move {
                let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
                let _ = server_write.shutdown().await;
            });
            let limit = match fault {
                Fault::Cut(n) => Some(n),
                _ => None,
            };
            let mut sent = 0usize;
            let mut buf = vec![0u8; 8192];
            let mut first = true;
            loop {
                let n = match server_read.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                if first {
                    first = false;
                    // One request per connection, so every request meets a fresh draw: the
                    // response (which is not signed) tells the client to close afterwards.
                    if let Some(end) = buf[..n].windows(2).position(|w| w == b"\r\n") {
                        let mut patched = buf[..end + 2].to_vec();
                        patched.extend_from_slice(b"Connection: close\r\n");
                        patched.extend_from_slice(&buf[end + 2..n]);
                        if client_write.write_all(&patched).await.is_err() {
                            break;
                        }
                        sent += n;
                        continue;
                    }
                }
                if let Some(limit) = limit {
                    if sent + n >= limit {
                        let keep = limit.saturating_sub(sent);
                        let _ = client_write.write_all(&buf[..keep]).await;
                        stats.cuts.fetch_add(1, Ordering::Relaxed);
                        up.abort();
                        return; // both halves drop: the connection dies mid-response
                    }
                }
                if client_write.write_all(&buf[..n]).await.is_err() {
                    break;
                }
                sent += n;
            }
            let _ = client_write.shutdown().await;
            let _ = up.await;
        }
    }
}

fn upstream() -> SocketAddr {
    let endpoint =
        std::env::var("AWS_ENDPOINT_URL").expect("scripts/test.sh sets AWS_ENDPOINT_URL");
    let url = url::Url::parse(&endpoint).unwrap();
    let host = url.host_str().unwrap();
    let port = url.port_or_known_default().unwrap();
    format!("{host}:{port}")
        .parse()
        .expect("the test server listens on an IP address")
}

const TIGHT: &str = "[storage.retry]\nmax_retries = 8\nretry_timeout_secs = 60\ninitial_backoff_ms = 20\nmax_backoff_ms = 400\nrequest_timeout_secs = 2\nconnect_timeout_secs = 2\n[run]\nlease_seconds = 6\n";

/// Runs until the lease of a failed run has lapsed.
fn run_until_unlocked(p: &TempProject) -> std::process::Output {
    for _ in 0..10 {
        let out = run(&mut p.cmd(&run_args()));
        if out.status.code() != Some(3) {
            return out;
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    panic!("the lease never lapsed");
}

#[test]
fn runs_through_a_faulty_network_complete_correctly_or_publish_nothing_half_done() {
    let test = "runs_through_a_faulty_network_complete_correctly_or_publish_nothing_half_done";
    if !s3_available(test) {
        return;
    }
    let base = s3_prefix();
    let clean = project(&format!("{base}/clean"), TIGHT);
    generate(&clean.path().join("data"), 80, 3, 99);
    ok(run(&mut clean.cmd(&run_args())));
    let expected = fingerprints(&format!("{base}/clean"));

    let (mut completed, mut failed_clean, mut failed_mid_publish) = (0, 0, 0);
    let mut faults = 0;
    let trials = 5;
    for seed in 0..trials {
        let output = format!("{base}/faulty{seed}");
        let p = project(&output, TIGHT);
        copy_dir(&clean.events(), &p.events());
        let proxy = Proxy::start(upstream(), seed);
        let out = run(p
            .cmd(&run_args())
            .env("AWS_ENDPOINT_URL", format!("http://{}", proxy.addr)));
        faults += proxy.injected.faults();
        eprintln!(
            "seed {seed}: {:?}, exit {:?}",
            proxy.injected,
            out.status.code()
        );
        drop(proxy);
        let seen = fingerprints(&output);
        if out.status.success() {
            completed += 1;
            assert!(
                differing(&seen, &expected).is_empty(),
                "seed {seed}: completed through faults with different tables: {:?}",
                differing(&seen, &expected)
            );
        } else {
            let text = format!("{}{}", stdout(&out), stderr(&out));
            eprintln!(
                "seed {seed}: failed: {}",
                text.lines().last().unwrap_or_default()
            );
            assert!(
                out.status.code().is_some(),
                "seed {seed}: not a clean exit: {text}"
            );
            let pending = {
                let rt = tokio::runtime::Runtime::new().unwrap();
                let place =
                    tessera::storage::Place::open(&output, std::path::Path::new("/"), "t").unwrap();
                rt.block_on(tessera::output::publish::pending(&place))
                    .unwrap()
            };
            if pending.is_empty() {
                failed_clean += 1;
                assert!(
                    seen.is_empty(),
                    "seed {seed}: failed yet published {:?}",
                    seen.keys()
                );
            } else {
                failed_mid_publish += 1;
            }
            // The next run, on a sound network, finishes the job.
            ok(run_until_unlocked(&p));
            let seen = fingerprints(&output);
            assert!(
                differing(&seen, &expected).is_empty(),
                "seed {seed}: the run after a failure differs: {:?}",
                differing(&seen, &expected)
            );
        }
    }
    eprintln!(
        "fault test: {trials} runs, {faults} faults injected, {completed} completed correctly, \
         {failed_clean} failed with nothing published, {failed_mid_publish} failed mid-publish and were finished by the next run"
    );
    assert!(faults >= 10, "faults were injected: {faults}");
}

//! Synthetic Segment-spec events with a known truth, for the sample project, tests and benchmarks.
//!
//! People browse on several devices, sign up, log in, type their email with stray capitals and
//! spaces, buy things; a few newsletter sign-ups never log in; a broken SDK sends one constant
//! anonymous_id; some events are redelivered exactly and a few are malformed. `truth.parquet`
//! says which person every identifier that appears belongs to, so identity accuracy can be
//! measured. Everything derives from the seed: the same seed gives the same rows.
//!
//! Memory stays bounded at any size: days are generated one after another, people within a day
//! in order, and rows go to a new file every `rows_per_file` rows.
//!
//! The defaults make friendly data: one person's events sit next to each other, as an export
//! sorted by user would. Knobs ([`GenerateOptions`]) make data like a real collector's instead:
//! rows in time order or shuffled across files (late and re-batched deliveries), more anonymous
//! ids per person, devices shared by a family or by everyone (a shop's kiosk), and more or other
//! junk ids; [`GenerateOptions::adversarial`] sets them all at once. Every knob draws from the
//! seed only when it is away from its default, so default output stays the same, byte for byte.

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray,
};
use arrow::datatypes::TimestampMicrosecondType;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use chrono::NaiveDate;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStoreExt, PutPayload};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::Result;
use crate::progress::Progress;
use crate::storage::Place;
use crate::tables::timestamp_type;

/// The anonymous_id a broken SDK sends for everyone.
pub const JUNK_ANONYMOUS_ID: &str = "00000000-0000-0000-0000-000000000000";
/// The email people type into forms to get past them.
pub const JUNK_EMAIL: &str = "test@test.com";
/// Junk anonymous_ids broken SDKs send, with [`JunkMix::Varied`].
pub const JUNK_ANONYMOUS_IDS: &[&str] = &[JUNK_ANONYMOUS_ID, "undefined", "null", "anonymous"];
/// Junk emails typed into forms, with [`JunkMix::Varied`].
pub const JUNK_EMAILS: &[&str] = &[JUNK_EMAIL, "a@a.com", "none@none.com", "no@email.com"];
/// At most this many anonymous ids per person (the truth keeps one bit per id).
pub const MAX_ANONYMOUS_IDS: usize = 28;

/// The order event rows are written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum EventOrder {
    /// Day by day, each person's events of the day together (an export sorted by user).
    #[default]
    ByPerson,
    /// Day by day, each day's rows in event-time order (a collector writing as events come).
    ByTime,
    /// Rows in arbitrary order across files, within windows of `shuffle_window` rows (late and
    /// re-batched deliveries): one person's events are almost never next to each other.
    Shuffled,
}

/// Which junk ids the junk rows carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum JunkMix {
    /// One constant anonymous_id ([`JUNK_ANONYMOUS_ID`]) and one junk email ([`JUNK_EMAIL`]).
    #[default]
    Constant,
    /// Several: [`JUNK_ANONYMOUS_IDS`] and [`JUNK_EMAILS`] (only `test@test.com` is on the
    /// bundled blocklist; the others must be caught by `max_links` and `limit`).
    Varied,
}

/// A named set of knobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Preset {
    /// The defaults: each person's events together, few devices, no shared devices.
    #[default]
    Friendly,
    /// Like the independent project the generator was measured against: see
    /// [`GenerateOptions::adversarial`].
    Adversarial,
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// How many people.
    pub people: u64,
    /// How many days of events.
    pub days: u32,
    /// The seed; the same seed gives the same rows.
    pub seed: u64,
    /// The first day.
    pub start: NaiveDate,
    /// Rows per Parquet file at most.
    pub rows_per_file: usize,
    /// The order rows are written in.
    pub order: EventOrder,
    /// With [`EventOrder::Shuffled`]: rows shuffled together (memory holds this many, about
    /// 400 bytes each).
    pub shuffle_window: usize,
    /// The share of identify calls after sign-up that carry traits (the email); the rest carry
    /// `{}`. Sign-up identify calls always carry them. Only identify calls ever carry traits.
    pub identify_traits: f64,
    /// The mean number of anonymous ids (devices, browsers, cleared cookies) a person has;
    /// `None`: about 1.6, each visit on one of them at random. With a number, each visit uses
    /// an id the person has not used yet while one is available, so people with enough visits
    /// show all of theirs.
    pub anonymous_ids: Option<f64>,
    /// The share of homes (groups of up to four neighbouring people) where 2 to 4 people share
    /// a family device, used for about a third of their visits.
    pub family_devices: f64,
    /// The share of visits made on one shop kiosk, whose anonymous_id everyone shares.
    pub kiosk: f64,
    /// Scales how often junk ids appear (1: 0.3% of visits send a junk anonymous_id, 0.4% of
    /// sign-ups type a junk email, 0.1% of logins send an empty user_id).
    pub junk: f64,
    /// Which junk ids.
    pub junk_mix: JunkMix,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            people: 1000,
            days: 30,
            seed: 42,
            start: NaiveDate::from_ymd_opt(2026, 10, 1).expect("valid date"),
            rows_per_file: 250_000,
            order: EventOrder::ByPerson,
            shuffle_window: 1_000_000,
            identify_traits: 0.5,
            anonymous_ids: None,
            family_devices: 0.0,
            kiosk: 0.0,
            junk: 1.0,
            junk_mix: JunkMix::Constant,
        }
    }
}

impl GenerateOptions {
    /// The knobs of `preset` on top of these options.
    pub fn with_preset(self, preset: Preset) -> Self {
        match preset {
            Preset::Friendly => self,
            Preset::Adversarial => self.adversarial(),
        }
    }

    /// Data like the independent project Tessera was measured against: rows shuffled across
    /// files, traits only on identify calls (as always), about 3.7 anonymous ids per person
    /// seen in the events, family devices in two homes of five, one kiosk, and varied junk.
    pub fn adversarial(self) -> Self {
        GenerateOptions {
            order: EventOrder::Shuffled,
            anonymous_ids: Some(ADVERSARIAL_ANONYMOUS_IDS),
            family_devices: 0.4,
            kiosk: 0.005,
            junk: 2.0,
            junk_mix: JunkMix::Varied,
            ..self
        }
    }

    /// Checks the knobs' ranges; the message names the flag.
    pub fn check(&self) -> std::result::Result<(), String> {
        let share = |name: &str, v: f64| {
            if (0.0..=1.0).contains(&v) {
                Ok(())
            } else {
                Err(format!("--{name} is a share between 0 and 1, not {v}"))
            }
        };
        share("identify-traits", self.identify_traits)?;
        share("family-devices", self.family_devices)?;
        share("kiosk", self.kiosk)?;
        if !(0.0..=100.0).contains(&self.junk) {
            return Err(format!(
                "--junk scales the junk rates: 0 (none) to 100, not {}",
                self.junk
            ));
        }
        if let Some(ids) = self.anonymous_ids {
            if !(1.0..=MAX_ANONYMOUS_IDS as f64 / 2.0).contains(&ids) {
                return Err(format!(
                    "--anonymous-ids is a mean between 1 and {}, not {ids}",
                    MAX_ANONYMOUS_IDS / 2
                ));
            }
        }
        if self.people == 0 || self.days == 0 || self.rows_per_file == 0 || self.shuffle_window == 0
        {
            return Err(
                "--people, --days, --rows-per-file and --shuffle-window must be at least 1".into(),
            );
        }
        Ok(())
    }
}

/// The adversarial preset's mean anonymous ids per person: about 3.7 of them are seen in the
/// events per person (people with few visits show fewer than they have).
const ADVERSARIAL_ANONYMOUS_IDS: f64 = 6.3;

/// What was generated.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct GenerateSummary {
    /// Event rows written, copies and malformed rows included.
    pub rows: u64,
    /// Rows that are exact copies of an earlier row (redeliveries).
    pub duplicates: u64,
    /// Rows that break a row check on purpose.
    pub malformed: u64,
    /// Event files written.
    pub files: u64,
    /// Rows of `truth.parquet`.
    pub truth_rows: u64,
}

const FIRST: &[&str] = &[
    "ada",
    "alan",
    "grace",
    "linus",
    "margaret",
    "dennis",
    "barbara",
    "ken",
    "frances",
    "edsger",
    "radia",
    "tim",
    "hedy",
    "john",
    "katherine",
    "donald",
    "sophie",
    "claude",
    "annie",
    "niklaus",
    "joan",
    "james",
    "mary",
    "robert",
    "lin",
    "wei",
    "amara",
    "kofi",
    "ines",
    "mateo",
    "yuki",
    "omar",
];
const LAST: &[&str] = &[
    "lovelace", "turing", "hopper", "torvalds", "hamilton", "ritchie", "liskov", "thompson",
    "allen", "dijkstra", "perlman", "berners", "lamarr", "backus", "johnson", "knuth", "wilson",
    "shannon", "easley", "wirth", "clarke", "gosling", "keller", "tarjan", "chen", "zhang",
    "okafor", "mensah", "garcia", "silva", "tanaka", "haddad",
];
const DOMAINS: &[&str] = &[
    "example.com",
    "mail.example",
    "inbox.test",
    "post.example.org",
];
const CATEGORIES: &[&str] = &["shoes", "shirts", "bags", "hats", "books", "games"];
const SOURCES: &[(&str, &str)] = &[
    ("google", "cpc"),
    ("newsletter", "email"),
    ("facebook", "social"),
    ("partner", "referral"),
];

fn mix(mut x: u64) -> u64 {
    // splitmix64: a fast, well-spread hash of a counter.
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn seed_for(seed: u64, person: u64, day: u64) -> u64 {
    mix(mix(seed ^ mix(person)) ^ day.wrapping_mul(0xA24B_AED4_963E_E407))
}

fn unit(h: u64) -> f64 {
    (h >> 11) as f64 / (1u64 << 53) as f64
}

fn uuid(rng: &mut ChaCha8Rng) -> String {
    let a: u128 = rng.gen();
    let h = format!("{a:032x}");
    format!(
        "{}-{}-4{}-a{}-{}",
        &h[0..8],
        &h[8..12],
        &h[13..16],
        &h[17..20],
        &h[20..32]
    )
}

/// One person's fixed attributes, derived from the seed alone.
struct Person {
    index: u64,
    first: &'static str,
    last: &'static str,
    email: Option<String>,
    user_id: Option<String>,
    /// Day of sign-up (account holders) or newsletter sign-up (email without account).
    signup_day: u32,
    phone: Option<String>,
    /// Devices: anonymous_id and first day used.
    devices: Vec<(String, u32)>,
    activity: f64,
    buyer: f64,
    /// The person whose first device this one sometimes borrows (a shared family tablet).
    borrows_from: Option<u64>,
    /// The anonymous_id of the device this person's home shares ([`GenerateOptions::family_devices`]).
    family: Option<String>,
}

/// Salts that give each knob its own stream of draws, apart from the people's.
const FAMILY_SALT: u64 = 0xFA_0001;
const KIOSK_SALT: u64 = 0xFA_0002;
const ORDER_SALT: u64 = 0xFA_0003;

impl Person {
    #[cfg(test)]
    fn new(seed: u64, index: u64, days: u32) -> Person {
        Person::of(
            &GenerateOptions {
                seed,
                days,
                ..GenerateOptions::default()
            },
            index,
        )
    }

    fn of(options: &GenerateOptions, index: u64) -> Person {
        let (seed, days) = (options.seed, options.days);
        let mut rng = ChaCha8Rng::seed_from_u64(seed_for(seed, index, u64::MAX));
        let first = FIRST[rng.gen_range(0..FIRST.len())];
        let last = LAST[rng.gen_range(0..LAST.len())];
        let ndev = match options.anonymous_ids {
            None => 1 + usize::from(rng.gen_bool(0.45)) + usize::from(rng.gen_bool(0.15)),
            Some(mean) => (1 + poisson(&mut rng, mean - 1.0)).min(MAX_ANONYMOUS_IDS),
        };
        let first_day = rng.gen_range(0..days.div_ceil(2).max(1));
        let mut devices = vec![(uuid(&mut rng), first_day)];
        for _ in 1..ndev {
            devices.push((
                uuid(&mut rng),
                rng.gen_range(first_day..days.max(first_day + 1)),
            ));
        }
        let has_account = rng.gen_bool(0.7);
        let newsletter = !has_account && rng.gen_bool(0.25);
        let domain = DOMAINS[rng.gen_range(0..DOMAINS.len())];
        let email = (has_account || newsletter).then(|| format!("{first}.{last}.{index}@{domain}"));
        let user_id = has_account.then(|| format!("usr_{index:07}"));
        let signup_day = rng.gen_range(first_day..days.max(first_day + 1));
        let phone = (has_account && rng.gen_bool(0.4)).then(|| {
            let area = 201 + (index / 8_000_000) % 700;
            let local = 2_000_000 + (index % 8_000_000) * 7919 % 8_000_000;
            format!("+1{area}{local:07}")
        });
        let u: f64 = rng.gen();
        let activity = 0.04 + 0.4 * u * u;
        let buyer = rng.gen_range(0.1..0.9);
        let borrows_from = (index > 0 && rng.gen_bool(0.01)).then(|| index - 1);
        Person {
            index,
            first,
            last,
            email,
            user_id,
            signup_day,
            phone,
            devices,
            activity,
            buyer,
            borrows_from,
            family: family_device(options, index),
        }
    }
}

/// The family device of `index`'s home, if it has one: people are grouped in fours by index;
/// a home is the first two to four of a group.
fn family_device(options: &GenerateOptions, index: u64) -> Option<String> {
    if options.family_devices <= 0.0 {
        return None;
    }
    let home = index / 4;
    let h = seed_for(options.seed ^ FAMILY_SALT, home, FAMILY_SALT);
    let size = 2 + (h >> 40) % 3;
    if unit(h) >= options.family_devices || index % 4 >= size {
        return None;
    }
    let mut rng = ChaCha8Rng::seed_from_u64(mix(h));
    Some(uuid(&mut rng))
}

/// The kiosk's anonymous_id (one per seed).
fn kiosk_device(seed: u64) -> String {
    let mut rng = ChaCha8Rng::seed_from_u64(seed_for(seed ^ KIOSK_SALT, u64::MAX, KIOSK_SALT));
    uuid(&mut rng)
}

/// A Poisson draw (Knuth's method: fine for the small means used here).
fn poisson(rng: &mut ChaCha8Rng, mean: f64) -> usize {
    if mean <= 0.0 {
        return 0;
    }
    let limit = (-mean).exp();
    let (mut k, mut p) = (0usize, 1.0f64);
    loop {
        p *= rng.gen::<f64>();
        if p <= limit || k >= 4 * MAX_ANONYMOUS_IDS {
            return k;
        }
        k += 1;
    }
}

/// Marks of which identifiers of a person appeared in events (for the truth).
type Seen = u32;
const SEEN_USER_ID: Seen = 1;
const SEEN_EMAIL: Seen = 2;
const SEEN_PHONE: Seen = 4;
const SEEN_DEVICE: Seen = 8; // device d uses bit 3 + d

/// Column buffers for one file of events.
#[derive(Default)]
struct Rows {
    message_id: Vec<Option<String>>,
    kind: Vec<Option<String>>,
    event: Vec<Option<String>>,
    anonymous_id: Vec<Option<String>>,
    user_id: Vec<Option<String>>,
    timestamp: Vec<Option<i64>>,
    received_at: Vec<Option<i64>>,
    traits: Vec<Option<String>>,
    properties: Vec<Option<String>>,
    context: Vec<Option<String>>,
}

struct Row {
    message_id: Option<String>,
    kind: String,
    event: Option<String>,
    anonymous_id: Option<String>,
    user_id: Option<String>,
    timestamp: Option<i64>,
    received_at: i64,
    traits: Option<String>,
    properties: Option<String>,
    context: Option<String>,
}

impl Rows {
    fn len(&self) -> usize {
        self.message_id.len()
    }

    fn push(&mut self, r: Row) {
        self.message_id.push(r.message_id);
        self.kind.push(Some(r.kind));
        self.event.push(r.event);
        self.anonymous_id.push(r.anonymous_id);
        self.user_id.push(r.user_id);
        self.timestamp.push(r.timestamp);
        self.received_at.push(Some(r.received_at));
        self.traits.push(r.traits);
        self.properties.push(r.properties);
        self.context.push(r.context);
    }

    fn copy_of_last(&self) -> Row {
        let i = self.len() - 1;
        Row {
            message_id: self.message_id[i].clone(),
            kind: self.kind[i].clone().unwrap_or_default(),
            event: self.event[i].clone(),
            anonymous_id: self.anonymous_id[i].clone(),
            user_id: self.user_id[i].clone(),
            timestamp: self.timestamp[i],
            received_at: self.received_at[i].unwrap_or_default(),
            traits: self.traits[i].clone(),
            properties: self.properties[i].clone(),
            context: self.context[i].clone(),
        }
    }

    fn take_batch(&mut self) -> Result<RecordBatch> {
        let taken = std::mem::take(self);
        let s = |v: Vec<Option<String>>| Arc::new(StringArray::from(v)) as ArrayRef;
        let t = |v: Vec<Option<i64>>| {
            Arc::new(TimestampMicrosecondArray::from(v).with_timezone("UTC")) as ArrayRef
        };
        Ok(RecordBatch::try_new(
            event_schema(),
            vec![
                s(taken.message_id),
                s(taken.kind),
                s(taken.event),
                s(taken.anonymous_id),
                s(taken.user_id),
                t(taken.timestamp),
                t(taken.received_at),
                s(taken.traits),
                s(taken.properties),
                s(taken.context),
            ],
        )?)
    }
}

/// The schema of generated event files (the Segment-spec columns).
pub fn event_schema() -> SchemaRef {
    let s = |n: &str| Field::new(n, DataType::Utf8, true);
    Arc::new(Schema::new(vec![
        s("message_id"),
        s("type"),
        s("event"),
        s("anonymous_id"),
        s("user_id"),
        Field::new("timestamp", timestamp_type(), true),
        Field::new("received_at", timestamp_type(), true),
        s("traits"),
        s("properties"),
        s("context"),
    ]))
}

/// The schema of `truth.parquet`.
pub fn truth_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("identifier_type", DataType::Utf8, false),
        Field::new("identifier_value", DataType::Utf8, false),
        Field::new("person", DataType::Int64, false),
    ]))
}

/// Encodes batches as one Parquet file in memory.
pub fn parquet_bytes(schema: SchemaRef, batches: &[RecordBatch]) -> Result<Vec<u8>> {
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(3)?))
        .build();
    let mut buffer = Vec::new();
    let mut writer = ArrowWriter::try_new(&mut buffer, schema, Some(props))?;
    for batch in batches {
        writer.write(batch)?;
    }
    writer.close()?;
    Ok(buffer)
}

/// How a person typed their email this time.
fn typed_email(rng: &mut ChaCha8Rng, email: &str) -> String {
    let mut typed = match rng.gen_range(0..20) {
        0..=2 => capitalise_words(email),
        3 => email.to_uppercase(),
        _ => email.to_string(),
    };
    if rng.gen_bool(0.1) {
        typed = format!(" {typed} ");
    }
    typed
}

fn capitalise_words(email: &str) -> String {
    let mut out = String::with_capacity(email.len());
    let mut start = true;
    for c in email.chars() {
        out.push(if start { c.to_ascii_uppercase() } else { c });
        start = matches!(c, '.' | '@');
    }
    out
}

/// How a person typed their phone number this time (all normalise to the same E.164).
fn typed_phone(rng: &mut ChaCha8Rng, e164: &str) -> String {
    let d = &e164[2..];
    match rng.gen_range(0..4) {
        0 => format!("+1 ({}) {}-{}", &d[0..3], &d[3..6], &d[6..10]),
        1 => format!("{}.{}.{}", &d[0..3], &d[3..6], &d[6..10]),
        2 => format!("({}) {}-{}", &d[0..3], &d[3..6], &d[6..10]),
        _ => e164.to_string(),
    }
}

/// Generates one person's events for one day into `rows`; marks identifiers seen.
struct DayWriter<'a> {
    seed: u64,
    options: &'a GenerateOptions,
    kiosk: &'a str,
    day: u32,
    day_start_us: i64,
    rows: &'a mut Rows,
    summary: &'a mut GenerateSummary,
    pending_copies: &'a mut Vec<Row>,
}

impl DayWriter<'_> {
    fn person(&mut self, p: &Person, partner: Option<&Person>, seen: &mut [Seen]) {
        let day = self.day;
        let first_day = p.devices[0].1;
        if day < first_day {
            return;
        }
        let key = seed_for(self.seed, p.index, day as u64);
        let signs_up = (p.user_id.is_some() || p.email.is_some()) && day == p.signup_day;
        if !signs_up && unit(key) >= p.activity {
            return;
        }
        let mut rng = ChaCha8Rng::seed_from_u64(key);
        let sessions = 1 + usize::from(rng.gen_bool(0.3));
        let mut clock = self.day_start_us + rng.gen_range(0..20 * 3600) as i64 * 1_000_000;
        for session in 0..sessions {
            let devices: Vec<usize> = (0..p.devices.len())
                .filter(|&i| p.devices[i].1 <= day)
                .collect();
            let unused = devices
                .iter()
                .copied()
                .find(|&d| seen[p.index as usize] & (SEEN_DEVICE << d) == 0);
            let device = match (self.options.anonymous_ids, unused) {
                (Some(_), Some(d)) => d,
                _ => devices[rng.gen_range(0..devices.len())],
            };
            let mut anon = p.devices[device].0.clone();
            let mut anon_owner = Some((p.index, device));
            if let (Some(q), true) = (partner, rng.gen_bool(0.3)) {
                if q.devices[0].1 <= day {
                    anon = q.devices[0].0.clone();
                    anon_owner = Some((q.index, 0));
                }
            }
            // Shared devices belong to no one person: the truth leaves them out.
            if let Some(family) = &p.family {
                if rng.gen_bool(0.3) {
                    anon = family.clone();
                    anon_owner = None;
                }
            }
            if self.options.kiosk > 0.0 && rng.gen_bool(self.options.kiosk) {
                anon = self.kiosk.to_string();
                anon_owner = None;
            }
            let junk = self.options.junk;
            if rng.gen_bool((0.003 * junk).min(1.0)) {
                anon = match self.options.junk_mix {
                    JunkMix::Constant => JUNK_ANONYMOUS_ID,
                    JunkMix::Varied => {
                        JUNK_ANONYMOUS_IDS[rng.gen_range(0..JUNK_ANONYMOUS_IDS.len())]
                    }
                }
                .to_string();
                anon_owner = None;
            }
            let signup_session = signs_up && session == 0;
            let logged_in = p.user_id.is_some()
                && (signup_session || (day > p.signup_day && rng.gen_bool(0.6)));
            let mut user = logged_in.then(|| p.user_id.clone()).flatten();
            if user.is_some() && rng.gen_bool((0.001 * junk).min(1.0)) {
                user = Some(String::new());
            }
            let campaign = rng
                .gen_bool(0.4)
                .then(|| SOURCES[rng.gen_range(0..SOURCES.len())]);
            let mut ctx = SessionCtx {
                anon,
                anon_owner,
                user,
                campaign,
            };

            self.emit_page(
                &mut rng,
                &mut clock,
                &mut ctx,
                if signup_session { "/signup" } else { "/" },
                p,
                seen,
            );
            if signup_session {
                let traits = self.signup_traits(&mut rng, p, seen, ctx.user.is_some());
                self.emit(
                    &mut rng,
                    &mut clock,
                    &ctx,
                    "identify",
                    None,
                    Some(traits),
                    None,
                    p,
                    seen,
                );
                if ctx.user.is_some() {
                    self.emit(
                        &mut rng,
                        &mut clock,
                        &ctx,
                        "track",
                        Some("Signed Up"),
                        None,
                        Some("{}".into()),
                        p,
                        seen,
                    );
                }
            } else if ctx.user.is_some() && rng.gen_bool(0.5) {
                let traits = match (&p.email, rng.gen_bool(self.options.identify_traits)) {
                    (Some(email), true) => {
                        seen[p.index as usize] |= SEEN_EMAIL;
                        format!(r#"{{"email":"{}"}}"#, typed_email(&mut rng, email))
                    }
                    _ => "{}".to_string(),
                };
                self.emit(
                    &mut rng,
                    &mut clock,
                    &ctx,
                    "identify",
                    None,
                    Some(traits),
                    None,
                    p,
                    seen,
                );
            }
            let pages = rng.gen_range(0..4);
            for _ in 0..pages {
                let path = format!("/c/{}", CATEGORIES[rng.gen_range(0..CATEGORIES.len())]);
                self.emit_page(&mut rng, &mut clock, &mut ctx, &path, p, seen);
            }
            let views = rng.gen_range(0..4);
            let mut cart: Option<(u32, f64)> = None;
            for _ in 0..views {
                let product = rng.gen_range(1..200u32);
                let price = 5.0 + (product % 40) as f64 * 2.5;
                let props = format!(
                    r#"{{"product_id":"p{product}","category":"{}","price":{price:.2}}}"#,
                    CATEGORIES[product as usize % CATEGORIES.len()]
                );
                self.emit(
                    &mut rng,
                    &mut clock,
                    &ctx,
                    "track",
                    Some("Product Viewed"),
                    None,
                    Some(props.clone()),
                    p,
                    seen,
                );
                if cart.is_none() && rng.gen_bool(0.3) {
                    self.emit(
                        &mut rng,
                        &mut clock,
                        &ctx,
                        "track",
                        Some("Product Added"),
                        None,
                        Some(props),
                        p,
                        seen,
                    );
                    cart = Some((product, price));
                }
            }
            if let Some((product, price)) = cart {
                if rng.gen_bool(0.6) {
                    let props = format!(r#"{{"product_id":"p{product}","value":{price:.2}}}"#);
                    self.emit(
                        &mut rng,
                        &mut clock,
                        &ctx,
                        "track",
                        Some("Checkout Started"),
                        None,
                        Some(props),
                        p,
                        seen,
                    );
                    if rng.gen_bool(p.buyer) && (ctx.user.is_some() || rng.gen_bool(0.3)) {
                        let quantity = rng.gen_range(1..4);
                        let revenue = price * quantity as f64;
                        let order = rng.gen_range(0..u32::MAX);
                        let props = format!(
                            r#"{{"order_id":"o{order:08x}","revenue":{revenue:.2},"currency":"USD","products":[{{"product_id":"p{product}","quantity":{quantity}}}]}}"#
                        );
                        self.emit(
                            &mut rng,
                            &mut clock,
                            &ctx,
                            "track",
                            Some("Order Completed"),
                            None,
                            Some(props),
                            p,
                            seen,
                        );
                    }
                }
            }
            clock += rng.gen_range(1800..4 * 3600) as i64 * 1_000_000;
        }
    }

    fn signup_traits(
        &self,
        rng: &mut ChaCha8Rng,
        p: &Person,
        seen: &mut [Seen],
        account: bool,
    ) -> String {
        let email = match &p.email {
            Some(_) if rng.gen_bool((0.004 * self.options.junk).min(1.0)) => {
                match self.options.junk_mix {
                    JunkMix::Constant => JUNK_EMAIL,
                    JunkMix::Varied => JUNK_EMAILS[rng.gen_range(0..JUNK_EMAILS.len())],
                }
                .to_string()
            }
            Some(email) => {
                seen[p.index as usize] |= SEEN_EMAIL;
                typed_email(rng, email)
            }
            None => String::new(),
        };
        let mut traits = format!(
            r#"{{"email":"{email}","first_name":"{}","last_name":"{}""#,
            capitalise_words(p.first),
            capitalise_words(p.last)
        );
        if account {
            let plan = ["free", "plus", "pro"][rng.gen_range(0..3)];
            traits.push_str(&format!(r#","plan":"{plan}""#));
        }
        if let Some(phone) = &p.phone {
            seen[p.index as usize] |= SEEN_PHONE;
            traits.push_str(&format!(r#","phone":"{}""#, typed_phone(rng, phone)));
        }
        traits.push('}');
        traits
    }

    fn emit_page(
        &mut self,
        rng: &mut ChaCha8Rng,
        clock: &mut i64,
        ctx: &mut SessionCtx,
        path: &str,
        p: &Person,
        seen: &mut [Seen],
    ) {
        let props = format!(r#"{{"path":"{path}","title":"Shop {path}"}}"#);
        self.emit_with_page(rng, clock, ctx, path, props, p, seen);
        ctx.campaign = None;
    }

    #[allow(clippy::too_many_arguments)]
    fn emit_with_page(
        &mut self,
        rng: &mut ChaCha8Rng,
        clock: &mut i64,
        ctx: &SessionCtx,
        path: &str,
        props: String,
        p: &Person,
        seen: &mut [Seen],
    ) {
        self.emit_full(
            rng,
            clock,
            ctx,
            "page",
            None,
            None,
            Some(props),
            Some(path),
            p,
            seen,
        );
    }

    #[allow(clippy::too_many_arguments)]
    fn emit(
        &mut self,
        rng: &mut ChaCha8Rng,
        clock: &mut i64,
        ctx: &SessionCtx,
        kind: &str,
        event: Option<&str>,
        traits: Option<String>,
        props: Option<String>,
        p: &Person,
        seen: &mut [Seen],
    ) {
        self.emit_full(rng, clock, ctx, kind, event, traits, props, None, p, seen);
    }

    #[allow(clippy::too_many_arguments)]
    fn emit_full(
        &mut self,
        rng: &mut ChaCha8Rng,
        clock: &mut i64,
        ctx: &SessionCtx,
        kind: &str,
        event: Option<&str>,
        traits: Option<String>,
        properties: Option<String>,
        page: Option<&str>,
        p: &Person,
        seen: &mut [Seen],
    ) {
        *clock += rng.gen_range(5..180) as i64 * 1_000_000;
        let mut context = String::from(r#"{"library":{"name":"analytics.js","version":"5.2.0"}"#);
        if let Some(path) = page {
            context.push_str(&format!(
                r#","page":{{"path":"{path}","url":"https://shop.example.com{path}"}}"#
            ));
        }
        if let Some((source, medium)) = ctx.campaign {
            context.push_str(&format!(
                r#","campaign":{{"source":"{source}","medium":"{medium}"}}"#
            ));
        }
        context.push('}');
        let delay = if rng.gen_bool(0.01) {
            rng.gen_range(3600..86_400)
        } else {
            rng.gen_range(0..3)
        } as i64
            * 1_000_000;
        let mut row = Row {
            message_id: Some(uuid(rng)),
            kind: kind.to_string(),
            event: event.map(str::to_string),
            anonymous_id: Some(ctx.anon.clone()),
            user_id: ctx.user.clone(),
            timestamp: Some(*clock),
            received_at: *clock + delay,
            traits,
            properties,
            context: Some(context),
        };
        if rng.gen_bool(0.0005) {
            // A malformed row, on purpose: each kind of row check gets exercised.
            self.summary.malformed += 1;
            match rng.gen_range(0..4) {
                0 => row.properties = Some(r#"{"revenue": 12.5"#.into()),
                1 => row.kind = "Track".into(),
                2 => row.message_id = None,
                _ => row.timestamp = None,
            }
        } else {
            if let Some((owner, device)) = ctx.anon_owner {
                seen[owner as usize] |= SEEN_DEVICE << device;
            }
            if ctx.user.as_deref().is_some_and(|u| !u.is_empty()) {
                seen[p.index as usize] |= SEEN_USER_ID;
            }
        }
        self.rows.push(row);
        self.summary.rows += 1;
        if rng.gen_bool(0.004) {
            // Redelivered later, byte for byte.
            self.pending_copies.push(self.rows.copy_of_last());
        }
    }
}

struct SessionCtx {
    anon: String,
    anon_owner: Option<(u64, usize)>,
    user: Option<String>,
    campaign: Option<(&'static str, &'static str)>,
}

/// Generates events under `<out>/events/date=…/part-N.parquet` and `<out>/truth.parquet`.
pub async fn generate(
    out: &Place,
    options: &GenerateOptions,
    progress: Progress,
) -> Result<GenerateSummary> {
    options.check().map_err(crate::error::Error::Usage)?;
    let mut summary = GenerateSummary::default();
    let people = options.people;
    let mut seen: Vec<Seen> = vec![0; people as usize];
    let mut pending: Vec<Row> = Vec::new();
    let kiosk = kiosk_device(options.seed);
    let bar = progress.bar("generating days", options.days as u64);
    let day0 = options
        .start
        .and_hms_opt(0, 0, 0)
        .expect("midnight")
        .and_utc()
        .timestamp_micros();
    let mut files = Files::new(out, options);
    for day in 0..options.days {
        let date = options.start + chrono::Days::new(day as u64);
        files.start_day(out.child("events").join(format!("date={date}")));
        for copy in pending.drain(..) {
            files.rows.push(copy);
            summary.rows += 1;
            summary.duplicates += 1;
        }
        for index in 0..people {
            let person = Person::of(options, index);
            let partner = person.borrows_from.map(|q| Person::of(options, q));
            let mut w = DayWriter {
                seed: options.seed,
                options,
                kiosk: &kiosk,
                day,
                day_start_us: day0 + day as i64 * 86_400_000_000,
                rows: &mut files.rows,
                summary: &mut summary,
                pending_copies: &mut pending,
            };
            w.person(&person, partner.as_ref(), &mut seen);
            files.after_person(&mut summary).await?;
        }
        files.end_day(&mut summary).await?;
        bar.inc(1);
    }
    if !pending.is_empty() {
        // Copies made on the last day land in one more file, as a late redelivery would.
        if options.order != EventOrder::Shuffled {
            files.part = 9000;
        }
        for copy in pending.drain(..) {
            files.rows.push(copy);
            summary.rows += 1;
            summary.duplicates += 1;
        }
        files.end_day(&mut summary).await?;
    }
    files.finish(&mut summary).await?;
    bar.finish_and_clear();
    summary.truth_rows = write_truth(out, options, &seen).await?;
    Ok(summary)
}

/// Where rows go on their way to files, in the order [`GenerateOptions::order`] asks for.
struct Files<'a> {
    out: &'a Place,
    options: &'a GenerateOptions,
    /// Rows being generated (at most `rows_per_file` of them).
    rows: Rows,
    /// Rows held back to be reordered (by time or shuffled), as compact batches.
    held: Vec<RecordBatch>,
    held_rows: usize,
    folder: ObjectPath,
    part: usize,
    /// Shuffled windows written so far (each window's shuffle has its own draws).
    windows: u64,
}

impl<'a> Files<'a> {
    fn new(out: &'a Place, options: &'a GenerateOptions) -> Self {
        Files {
            out,
            options,
            rows: Rows::default(),
            held: Vec::new(),
            held_rows: 0,
            folder: out.child("events"),
            part: 0,
            windows: 0,
        }
    }

    fn start_day(&mut self, folder: ObjectPath) {
        self.folder = folder;
        self.part = 0;
    }

    async fn after_person(&mut self, summary: &mut GenerateSummary) -> Result<()> {
        if self.rows.len() < self.options.rows_per_file {
            return Ok(());
        }
        match self.options.order {
            EventOrder::ByPerson => {
                let batch = self.rows.take_batch()?;
                self.write(batch, summary).await
            }
            EventOrder::ByTime => self.hold(),
            EventOrder::Shuffled => {
                self.hold()?;
                if self.held_rows >= self.options.shuffle_window {
                    self.write_shuffled(summary).await?;
                }
                Ok(())
            }
        }
    }

    async fn end_day(&mut self, summary: &mut GenerateSummary) -> Result<()> {
        match self.options.order {
            EventOrder::ByPerson => {
                if self.rows.len() > 0 {
                    let batch = self.rows.take_batch()?;
                    self.write(batch, summary).await?;
                }
                Ok(())
            }
            EventOrder::ByTime => {
                self.hold()?;
                self.write_by_time(summary).await
            }
            // A window spans days: its files land in the folder of the day it fills up on,
            // as a re-batched delivery would.
            EventOrder::Shuffled => Ok(()),
        }
    }

    async fn finish(&mut self, summary: &mut GenerateSummary) -> Result<()> {
        self.hold()?;
        match self.options.order {
            EventOrder::Shuffled => self.write_shuffled(summary).await,
            _ => self.write_by_time(summary).await,
        }
    }

    fn hold(&mut self) -> Result<()> {
        if self.rows.len() > 0 {
            self.held_rows += self.rows.len();
            self.held.push(self.rows.take_batch()?);
        }
        Ok(())
    }

    /// The held rows in event-time order (rows without a time by their receipt time), ties in
    /// the order they were made.
    async fn write_by_time(&mut self, summary: &mut GenerateSummary) -> Result<()> {
        let mut order: Vec<(i64, usize, usize)> = Vec::with_capacity(self.held_rows);
        for (b, batch) in self.held.iter().enumerate() {
            let ts = batch.column(5).as_primitive::<TimestampMicrosecondType>();
            let received = batch.column(6).as_primitive::<TimestampMicrosecondType>();
            for r in 0..batch.num_rows() {
                let t = if ts.is_valid(r) {
                    ts.value(r)
                } else {
                    received.value(r)
                };
                order.push((t, b, r));
            }
        }
        order.sort_by_key(|&(t, _, _)| t);
        let indices: Vec<(usize, usize)> = order.into_iter().map(|(_, b, r)| (b, r)).collect();
        self.write_held(&indices, summary).await
    }

    /// The held rows in an order drawn from the seed.
    async fn write_shuffled(&mut self, summary: &mut GenerateSummary) -> Result<()> {
        let mut indices: Vec<(usize, usize)> = Vec::with_capacity(self.held_rows);
        for (b, batch) in self.held.iter().enumerate() {
            indices.extend((0..batch.num_rows()).map(|r| (b, r)));
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed_for(
            self.options.seed ^ ORDER_SALT,
            self.windows,
            ORDER_SALT,
        ));
        self.windows += 1;
        indices.shuffle(&mut rng);
        self.write_held(&indices, summary).await
    }

    async fn write_held(
        &mut self,
        indices: &[(usize, usize)],
        summary: &mut GenerateSummary,
    ) -> Result<()> {
        let held = std::mem::take(&mut self.held);
        self.held_rows = 0;
        let batches: Vec<&RecordBatch> = held.iter().collect();
        for chunk in indices.chunks(self.options.rows_per_file) {
            let batch = arrow::compute::interleave_record_batch(&batches, chunk)?;
            self.write(batch, summary).await?;
        }
        Ok(())
    }

    async fn write(&mut self, batch: RecordBatch, summary: &mut GenerateSummary) -> Result<()> {
        let bytes = parquet_bytes(event_schema(), &[batch])?;
        let path = self
            .folder
            .clone()
            .join(format!("part-{:05}.parquet", self.part));
        self.out.store.put(&path, PutPayload::from(bytes)).await?;
        self.part += 1;
        summary.files += 1;
        Ok(())
    }
}

async fn write_truth(out: &Place, options: &GenerateOptions, seen: &[Seen]) -> Result<u64> {
    let mut types: Vec<&'static str> = Vec::new();
    let mut values: Vec<String> = Vec::new();
    let mut persons: Vec<i64> = Vec::new();
    for (index, &marks) in seen.iter().enumerate() {
        if marks == 0 {
            continue;
        }
        let p = Person::of(options, index as u64);
        let mut add = |t: &'static str, v: &str| {
            types.push(t);
            values.push(v.to_string());
            persons.push(index as i64);
        };
        if marks & SEEN_USER_ID != 0 {
            add("user_id", p.user_id.as_deref().unwrap_or_default());
        }
        if marks & SEEN_EMAIL != 0 {
            add("email", p.email.as_deref().unwrap_or_default());
        }
        if marks & SEEN_PHONE != 0 {
            add("phone", p.phone.as_deref().unwrap_or_default());
        }
        for (device, (anon, _)) in p.devices.iter().enumerate() {
            if marks & (SEEN_DEVICE << device) != 0 {
                add("anonymous_id", anon);
            }
        }
    }
    let rows = types.len() as u64;
    let batch = RecordBatch::try_new(
        truth_schema(),
        vec![
            Arc::new(StringArray::from(types)) as ArrayRef,
            Arc::new(StringArray::from(values)) as ArrayRef,
            Arc::new(Int64Array::from(persons)) as ArrayRef,
        ],
    )?;
    let bytes = parquet_bytes(truth_schema(), &[batch])?;
    out.store
        .put(&out.child("truth.parquet"), PutPayload::from(bytes))
        .await?;
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typed_variants_normalise_back() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for _ in 0..200 {
            let typed = typed_email(&mut rng, "ada.lovelace.7@example.com");
            assert_eq!(typed.trim().to_lowercase(), "ada.lovelace.7@example.com");
            let phone = typed_phone(&mut rng, "+14155550123");
            let digits: String = phone.chars().filter(char::is_ascii_digit).collect();
            assert!(digits == "14155550123" || digits == "4155550123", "{phone}");
        }
    }

    #[test]
    fn people_are_deterministic_and_distinct() {
        let a = Person::new(7, 3, 30);
        let b = Person::new(7, 3, 30);
        assert_eq!(a.devices, b.devices);
        assert_eq!(a.email, b.email);
        let c = Person::new(7, 4, 30);
        assert_ne!(a.devices[0].0, c.devices[0].0);
        let phones: std::collections::HashSet<_> = (0..5000)
            .filter_map(|i| Person::new(1, i, 30).phone)
            .collect();
        let with_phone = (0..5000)
            .filter(|&i| Person::new(1, i, 30).phone.is_some())
            .count();
        assert_eq!(
            phones.len(),
            with_phone,
            "phone numbers must be unique per person"
        );
    }
}

//! The identity graph in memory: identifiers interned to dense ids, links deduplicated and
//! applied in time order by a union-find that enforces the merge rules in O(1) per link.
//!
//! Pure Rust, no DataFusion: the stage in `identity/mod.rs` feeds it rows and reads back
//! components, accepted links and refusals. Grouping never depends on the order rows arrive in:
//! links are sorted by (seen_at, then the identifiers' types and values) before they are applied.

use std::borrow::Cow;
use std::cmp::Ordering;
use std::collections::HashSet;
use std::hash::BuildHasher;

use super::normalize::{normalize, Dropped};
use crate::config::{IdentityConfig, Normalize};

/// A dense identifier id.
pub type Node = u32;

/// `seen_at` of a row that has none: sorted after every real time.
pub const NO_TIME: i64 = i64::MAX;

/// One identifier type's rules.
#[derive(Debug, Clone)]
pub struct TypeRule {
    /// The type's name (an identity query column).
    pub name: String,
    /// Its normaliser.
    pub normalize: Normalize,
    /// At most this many values of the type in one profile.
    pub limit: Option<u32>,
    /// Normalised, lowercased values that never link.
    pub blocklist: HashSet<String>,
    /// More distinct links than this makes a value shared junk.
    pub max_links: Option<u32>,
}

/// All identifier rules, highest priority first.
#[derive(Debug, Clone)]
pub struct Rules {
    /// Types in priority order; a type's index is its priority (0 = highest).
    pub types: Vec<TypeRule>,
    /// Calling code for phone numbers without one.
    pub country: String,
}

impl Rules {
    /// Rules from `[identity]`.
    pub fn from_config(config: &IdentityConfig) -> Rules {
        let country = config.default_country_code.clone();
        let types = config
            .identifiers
            .iter()
            .map(|id| TypeRule {
                name: id.name.clone(),
                normalize: id.normalize,
                limit: id.limit.map(|l| l.min(u32::MAX as u64) as u32),
                blocklist: id
                    .blocklist
                    .iter()
                    .map(|v| {
                        normalize(id.normalize, v, &country)
                            .map(|n| n.to_lowercase())
                            .unwrap_or_else(|_| v.to_lowercase())
                    })
                    .collect(),
                max_links: id.max_links.map(|l| l.min(u32::MAX as u64) as u32),
            })
            .collect();
        Rules { types, country }
    }

    /// The priority index of type `name`.
    pub fn type_index(&self, name: &str) -> Option<u8> {
        self.types
            .iter()
            .position(|t| t.name == name)
            .map(|i| i as u8)
    }

    /// Normalises a value of type `t`, or says why it is dropped (blocklisted included).
    pub fn clean<'a>(&self, t: u8, raw: &'a str) -> Result<Cow<'a, str>, Reason> {
        let rule = &self.types[t as usize];
        let value = normalize(rule.normalize, raw, &self.country).map_err(|d| match d {
            Dropped::Empty => Reason::Empty,
            Dropped::Invalid => Reason::Invalid,
        })?;
        if !rule.blocklist.is_empty() {
            let blocked = if value.chars().any(char::is_uppercase) {
                rule.blocklist.contains(&value.to_lowercase())
            } else {
                rule.blocklist.contains(value.as_ref())
            };
            if blocked {
                return Err(Reason::Blocklisted);
            }
        }
        Ok(value)
    }
}

/// Why a link was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    /// The value is on its type's blocklist.
    Blocklisted,
    /// The value is empty after normalising.
    Empty,
    /// The value is not a valid value of its type.
    Invalid,
    /// The value is linked to more identifiers than its type's `max_links`.
    MaxLinks,
    /// The link would put more values of this type (index) into one profile than its `limit`.
    Limit(u8),
}

impl Reason {
    /// The reason as stored in `identity_conflicts.reason`.
    pub fn describe(self, rules: &Rules) -> String {
        match self {
            Reason::Blocklisted => "blocklisted".into(),
            Reason::Empty => "empty value".into(),
            Reason::Invalid => "invalid value".into(),
            Reason::MaxLinks => "max_links exceeded".into(),
            Reason::Limit(t) => {
                let rule = &rules.types[t as usize];
                format!("limit: {} ({})", rule.name, rule.limit.unwrap_or(0))
            }
        }
    }
}

/// One side of a refused link: an identifier in the graph, or a value that never entered it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Side {
    /// An interned identifier.
    Node(Node),
    /// A dropped value (blocklisted, empty or invalid), as its type and text.
    Value(u8, String),
}

/// A refused link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The identifier that was refused (the lower-priority side, or the shared one).
    pub refused: Side,
    /// The identifier it would have linked to.
    pub other: Side,
    /// Why.
    pub reason: Reason,
    /// When the link was first seen.
    pub seen_at: i64,
    /// Which identity query produced it (index into the query list).
    pub query: u16,
}

/// A link: `low` (a lower-priority identifier) joins `top` (the highest-priority one of its row).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Link {
    /// The lower-priority identifier.
    pub low: Node,
    /// The highest-priority identifier of the row.
    pub top: Node,
    /// When first seen.
    pub seen_at: i64,
    /// Which identity query produced it.
    pub query: u16,
}

/// One interned identifier: where its value is in the arena, its type, and when it was seen.
/// One record rather than an array per field: on unordered rows every identifier is a cache
/// miss, and finding it, checking its type and widening its times then costs one miss, not four.
#[derive(Debug, Clone, Copy)]
struct Entry {
    start: u64,
    first_seen: i64,
    last_seen: i64,
    len: u32,
    kind: u8,
}

/// An identifier to intern, with its hash and the times to widen its own by.
struct Key<'a> {
    kind: u8,
    value: &'a [u8],
    hash: u64,
    first_seen: i64,
    last_seen: i64,
}

/// A table slot: 0 when empty, else the hash's top 32 bits above `node + 1`.
pub(super) type Slot = u64;
pub(super) const EMPTY: Slot = 0;
pub(super) const TAG: u64 = 0xFFFF_FFFF_0000_0000;

/// Identifiers interned into one byte arena (values back to back, in node order), found through
/// an open-addressing table with linear probing. A slot carries its hash's top bits, so a probe
/// reads a record only when they match; and since a slot's place follows from the hash alone,
/// [`Resolver::add_block`] can prefetch slots, then records, then values, rows ahead of need.
/// About 45 bytes per identifier beyond its text.
struct Interner {
    slots: Vec<Slot>,
    entries: Vec<Entry>,
    bytes: Vec<u8>,
    hasher: foldhash::fast::FixedState,
}

/// Asks the CPU to start loading `p`'s cache line; a hint, never a read.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(super) fn prefetch<T>(p: *const T) {
    // SAFETY: a prefetch never faults and reads nothing into the program, whatever the address.
    unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p as *const i8) }
}

/// Elsewhere: no prefetch (the intake is correct without one, only slower on unordered rows).
#[cfg(not(target_arch = "x86_64"))]
#[inline(always)]
pub(super) fn prefetch<T>(_: *const T) {}

impl Interner {
    fn new() -> Self {
        Interner {
            slots: vec![EMPTY; 1024],
            entries: Vec::new(),
            bytes: Vec::new(),
            hasher: foldhash::fast::FixedState::with_seed(0x7e55e7a),
        }
    }

    fn len(&self) -> usize {
        self.entries.len()
    }

    /// Hashes and compares work on bytes: checking the arena's UTF-8 again on every probe
    /// was a fifth of the identity stage.
    fn hash(&self, t: u8, v: &[u8]) -> u64 {
        self.hasher.hash_one((t, v))
    }

    fn kind(&self, n: Node) -> u8 {
        self.entries[n as usize].kind
    }

    fn entry_bytes(&self, e: &Entry) -> &[u8] {
        &self.bytes[e.start as usize..e.start as usize + e.len as usize]
    }

    fn bytes(&self, n: Node) -> &[u8] {
        self.entry_bytes(&self.entries[n as usize])
    }

    fn value(&self, n: Node) -> &str {
        // Only whole &str values are ever appended, so every slice is valid UTF-8.
        std::str::from_utf8(self.bytes(n)).expect("arena holds UTF-8")
    }

    fn seen(&self, n: Node) -> (i64, i64) {
        let e = &self.entries[n as usize];
        (e.first_seen, e.last_seen)
    }

    /// Widens an identifier's first/last seen to include `seen_at`.
    fn touch(&mut self, n: Node, seen_at: i64) {
        let e = &mut self.entries[n as usize];
        e.first_seen = e.first_seen.min(seen_at);
        if seen_at != NO_TIME && (e.last_seen == NO_TIME || seen_at > e.last_seen) {
            e.last_seen = seen_at;
        }
    }

    fn mask(&self) -> usize {
        self.slots.len() - 1
    }

    /// The node of `(t, v)` (hash `h`), or the empty slot where it would go.
    fn find(&self, t: u8, v: &[u8], h: u64) -> std::result::Result<Node, usize> {
        let mask = self.mask();
        let tag = h & TAG;
        let mut i = h as usize & mask;
        loop {
            let slot = self.slots[i];
            if slot == EMPTY {
                return Err(i);
            }
            if slot & TAG == tag {
                let n = (slot as u32).wrapping_sub(1);
                let e = &self.entries[n as usize];
                if e.kind == t && self.entry_bytes(e) == v {
                    return Ok(n);
                }
            }
            i = (i + 1) & mask;
        }
    }

    fn get(&self, t: u8, v: &str) -> Option<Node> {
        let v = v.as_bytes();
        self.find(t, v, self.hash(t, v)).ok()
    }

    fn intern(&mut self, t: u8, v: &str) -> Node {
        let v = v.as_bytes();
        self.intern_hashed(t, v, self.hash(t, v))
    }

    /// Interns `(t, v)` whose hash is `h`; a new identifier has no times yet (`NO_TIME`).
    fn intern_hashed(&mut self, t: u8, v: &[u8], h: u64) -> Node {
        match self.find(t, v, h) {
            Ok(n) => n,
            Err(slot) => {
                let n = self.entries.len();
                assert!(n < u32::MAX as usize - 1, "more than 4 billion identifiers");
                self.entries.push(Entry {
                    start: self.bytes.len() as u64,
                    first_seen: NO_TIME,
                    last_seen: NO_TIME,
                    len: v.len() as u32,
                    kind: t,
                });
                self.bytes.extend_from_slice(v);
                self.slots[slot] = (h & TAG) | (n as u64 + 1);
                // At most three quarters full: probes stay short, mostly within one cache line.
                if self.entries.len() * 4 > self.slots.len() * 3 {
                    self.grow();
                }
                n as Node
            }
        }
    }

    fn grow(&mut self) {
        let mut slots = vec![EMPTY; self.slots.len() * 2];
        let mask = slots.len() - 1;
        for (n, e) in self.entries.iter().enumerate() {
            let h = self.hasher.hash_one((e.kind, self.entry_bytes(e)));
            let mut i = h as usize & mask;
            while slots[i] != EMPTY {
                i = (i + 1) & mask;
            }
            slots[i] = (h & TAG) | (n as u64 + 1);
        }
        self.slots = slots;
    }

    /// Interns keys in order (the same nodes as one by one) and widens each one's times,
    /// appending their nodes to `nodes`, with each key's slot, then record, then value
    /// prefetched a few keys ahead: on unordered rows nearly every key misses the cache, and
    /// one by one each miss waited for the one before.
    fn intern_many(&mut self, keys: &[Key], nodes: &mut Vec<Node>) {
        const SLOT_AHEAD: usize = 16;
        const ENTRY_AHEAD: usize = 8;
        const VALUE_AHEAD: usize = 4;
        let mut guess: Vec<Node> = vec![Node::MAX; keys.len()];
        for (i, key) in keys.iter().enumerate() {
            if let Some(ahead) = keys.get(i + SLOT_AHEAD) {
                self.prefetch_slot(ahead.hash);
            }
            if let Some(ahead) = keys.get(i + ENTRY_AHEAD) {
                if let Some(n) = self.prefetch_entry(ahead.hash) {
                    guess[i + ENTRY_AHEAD] = n;
                }
            }
            if let Some(&n) = guess.get(i + VALUE_AHEAD) {
                if n != Node::MAX {
                    self.prefetch_value(n);
                }
            }
            let n = self.intern_hashed(key.kind, key.value, key.hash);
            self.touch(n, key.first_seen);
            self.touch(n, key.last_seen);
            nodes.push(n);
        }
    }

    /// Starts loading the slot where `h`'s probe begins.
    fn prefetch_slot(&self, h: u64) {
        prefetch(&self.slots[h as usize & self.mask()]);
    }

    /// With `h`'s slot loaded: starts loading the record of the first node whose tag matches,
    /// and returns that node (a guess, for [`Interner::prefetch_value`]).
    fn prefetch_entry(&self, h: u64) -> Option<Node> {
        let mask = self.mask();
        let mut i = h as usize & mask;
        loop {
            let slot = self.slots[i];
            if slot == EMPTY {
                return None;
            }
            if slot & TAG == h & TAG {
                let n = (slot as u32).wrapping_sub(1);
                prefetch(&self.entries[n as usize]);
                return Some(n);
            }
            i = (i + 1) & mask;
        }
    }

    /// With `n`'s record loaded: starts loading its value.
    fn prefetch_value(&self, n: Node) {
        let e = &self.entries[n as usize];
        if let Some(b) = self.bytes.get(e.start as usize) {
            prefetch(b);
        }
    }
}

/// Rows of identifiers for [`Resolver::add_block`], laid out flat.
#[derive(Debug, Default)]
pub struct Block<'a> {
    /// Every row's (type index, raw value) pairs, row after row, each row in priority order.
    pub ids: Vec<(u8, &'a str)>,
    /// Where each row ends in `ids`.
    pub ends: Vec<u32>,
    /// Each row's seen_at (`NO_TIME` when it has none).
    pub seen_at: Vec<i64>,
}

impl<'a> Block<'a> {
    /// Rows in the block.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// True when the block has no rows.
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// Row `r`'s identifiers.
    pub fn row(&self, r: usize) -> &[(u8, &'a str)] {
        let start = if r == 0 { 0 } else { self.ends[r - 1] as usize };
        &self.ids[start..self.ends[r] as usize]
    }

    /// Ends the row whose identifiers were pushed onto `ids` since the last one.
    pub fn end_row(&mut self, seen_at: i64) {
        self.ends.push(self.ids.len() as u32);
        self.seen_at.push(seen_at);
    }
}

/// A value of a row of a block, cleaned and hashed, waiting to be interned.
struct Cleaned<'a> {
    t: u8,
    value: Cow<'a, str>,
    hash: u64,
    row: u32,
}

/// Collects rows of identifiers seen together, then resolves them.
pub struct Resolver {
    rules: Rules,
    ids: Interner,
    links: Vec<Link>,
    dropped: Vec<Refusal>,
    repeat: LastRow,
}

/// The previous row, kept to recognise a repeat without normalising or hashing.
#[derive(Default)]
struct LastRow {
    values: Vec<(u8, String)>,
    query: u16,
    nodes: Vec<Node>,
    seen_at: i64,
    dropped: bool,
    valid: bool,
}

impl LastRow {
    fn matches(&self, row: &[(u8, &str)], query: u16) -> bool {
        self.valid
            && self.query == query
            && self.values.len() == row.len()
            && self
                .values
                .iter()
                .zip(row)
                .all(|((a, x), (b, y))| a == b && x == y)
    }

    fn remember(
        &mut self,
        row: &[(u8, &str)],
        query: u16,
        nodes: &[Node],
        seen_at: i64,
        dropped: bool,
    ) {
        // Reuse the buffers: no allocation once they have grown to a row's size.
        self.values.truncate(row.len());
        for (i, (t, v)) in row.iter().enumerate() {
            match self.values.get_mut(i) {
                Some(slot) => {
                    slot.0 = *t;
                    slot.1.clear();
                    slot.1.push_str(v);
                }
                None => self.values.push((*t, v.to_string())),
            }
        }
        self.query = query;
        self.nodes.clear();
        self.nodes.extend_from_slice(nodes);
        self.seen_at = seen_at;
        self.dropped = dropped;
        self.valid = true;
    }
}

impl Resolver {
    /// An empty graph under `rules`.
    pub fn new(rules: Rules) -> Self {
        Resolver {
            rules,
            ids: Interner::new(),
            links: Vec::new(),
            dropped: Vec::new(),
            repeat: LastRow::default(),
        }
    }

    /// The rules.
    pub fn rules(&self) -> &Rules {
        &self.rules
    }

    /// Every identifier added so far, as (type index, normalised value).
    pub fn identifiers(&self) -> impl Iterator<Item = (u8, &str)> + '_ {
        (0..self.ids.len() as Node).map(|n| (self.ids.kind(n), self.ids.value(n)))
    }

    /// Adds one row: identifiers (type index, raw value) seen together at `seen_at`.
    ///
    /// Every kept identifier links to the row's highest-priority one. The row's kept
    /// identifiers go to `nodes`, highest priority first.
    pub fn add_row(&mut self, row: &[(u8, &str)], seen_at: i64, query: u16, nodes: &mut Vec<Node>) {
        nodes.clear();
        // Rows of one session often repeat the same identifiers (every page view carries the
        // device id): reuse the last row's nodes instead of normalising and hashing again.
        if self.repeat.matches(row, query) {
            nodes.extend_from_slice(&self.repeat.nodes);
            for &n in nodes.iter() {
                self.ids.touch(n, seen_at);
            }
            if seen_at >= self.repeat.seen_at && !self.repeat.dropped {
                // Its links and refusals are already recorded with an earlier or equal time.
                return;
            }
        }
        let sorted = row.windows(2).all(|w| w[0].0 < w[1].0);
        let mut order: Vec<(u8, &str)>;
        let row = if sorted {
            row
        } else {
            order = row.to_vec();
            order.sort_by_key(|(t, _)| *t);
            &order
        };
        let mut dropped: Vec<(u8, String, Reason)> = Vec::new();
        for &(t, raw) in row {
            match self.rules.clean(t, raw) {
                Ok(value) => {
                    let n = self.ids.intern(t, &value);
                    self.ids.touch(n, seen_at);
                    if !nodes.contains(&n) {
                        nodes.push(n);
                    }
                }
                Err(reason) => {
                    let shown = if reason == Reason::Blocklisted {
                        self.rules.clean_for_display(t, raw)
                    } else {
                        raw.to_string()
                    };
                    dropped.push((t, shown, reason));
                }
            }
        }
        self.repeat
            .remember(row, query, nodes, seen_at, !dropped.is_empty());
        let Some(&top) = nodes.first() else { return };
        for &low in &nodes[1..] {
            self.links.push(Link {
                low,
                top,
                seen_at,
                query,
            });
        }
        for (t, value, reason) in dropped {
            self.dropped.push(Refusal {
                refused: Side::Value(t, value),
                other: Side::Node(top),
                reason,
                seen_at,
                query,
            });
        }
    }

    /// Adds a block of rows exactly as [`Resolver::add_row`] would one after another (the same
    /// nodes, links, refusals and times), in passes: every value is cleaned and hashed first,
    /// then interned in order while the table slots, records and values of the identifiers a
    /// little further on are prefetched. On unordered rows nearly every identifier misses the
    /// cache; one by one, each miss waited for the last. Each row's kept identifiers go to
    /// `nodes`, highest priority first, row `r` ending at `node_ends[r]`.
    pub fn add_block(
        &mut self,
        block: &Block,
        query: u16,
        nodes: &mut Vec<Node>,
        node_ends: &mut Vec<u32>,
    ) {
        nodes.clear();
        node_ends.clear();
        let rows = block.len();
        if !(0..rows).all(|r| block.row(r).windows(2).all(|w| w[0].0 < w[1].0)) {
            // Rows out of priority order: add_row sorts each.
            let mut out = Vec::new();
            for r in 0..rows {
                self.add_row(block.row(r), block.seen_at[r], query, &mut out);
                nodes.extend_from_slice(&out);
                node_ends.push(nodes.len() as u32);
            }
            return;
        }

        // Pass 1: the rows add_row would skip as repeats of the row before (only widening its
        // identifiers' times), and the cleaned, hashed values of all the others.
        let mut full = Vec::with_capacity(rows);
        let mut cleaned: Vec<Cleaned> = Vec::with_capacity(block.ids.len());
        let mut drops: Vec<(u32, u8, String, Reason)> = Vec::new();
        let (mut run_seen, mut run_dropped) = (self.repeat.seen_at, self.repeat.dropped);
        for r in 0..rows {
            let row = block.row(r);
            let seen_at = block.seen_at[r];
            let same = if r == 0 {
                self.repeat.matches(row, query)
            } else {
                row == block.row(r - 1)
            };
            if same && seen_at >= run_seen && !run_dropped {
                full.push(false);
                continue;
            }
            full.push(true);
            let mut dropped = false;
            for &(t, raw) in row {
                match self.rules.clean(t, raw) {
                    Ok(value) => {
                        let hash = self.ids.hash(t, value.as_bytes());
                        cleaned.push(Cleaned {
                            t,
                            value,
                            hash,
                            row: r as u32,
                        });
                    }
                    Err(reason) => {
                        dropped = true;
                        let shown = if reason == Reason::Blocklisted {
                            self.rules.clean_for_display(t, raw)
                        } else {
                            raw.to_string()
                        };
                        drops.push((r as u32, t, shown, reason));
                    }
                }
            }
            (run_seen, run_dropped) = (seen_at, dropped);
        }

        // Pass 2: intern in row order, so nodes are numbered as add_row numbers them.
        let keys: Vec<Key> = cleaned
            .iter()
            .map(|c| {
                let seen_at = block.seen_at[c.row as usize];
                Key {
                    kind: c.t,
                    value: c.value.as_bytes(),
                    hash: c.hash,
                    first_seen: seen_at,
                    last_seen: seen_at,
                }
            })
            .collect();
        let mut node_of = Vec::with_capacity(keys.len());
        self.ids.intern_many(&keys, &mut node_of);

        // Pass 3: each row's nodes, links and refusals, in row order.
        let mut run_nodes: Vec<Node> = self.repeat.nodes.clone();
        let (mut c, mut d) = (0, 0);
        for (r, &is_full) in full.iter().enumerate() {
            let seen_at = block.seen_at[r];
            if !is_full {
                for &n in &run_nodes {
                    self.ids.touch(n, seen_at);
                }
                nodes.extend_from_slice(&run_nodes);
                node_ends.push(nodes.len() as u32);
                continue;
            }
            let start = nodes.len();
            while c < cleaned.len() && cleaned[c].row as usize == r {
                let n = node_of[c];
                if !nodes[start..].contains(&n) {
                    nodes.push(n);
                }
                c += 1;
            }
            let top = nodes.get(start).copied();
            if let Some(top) = top {
                for &low in &nodes[start + 1..] {
                    self.links.push(Link {
                        low,
                        top,
                        seen_at,
                        query,
                    });
                }
            }
            while d < drops.len() && drops[d].0 as usize == r {
                let (_, t, ref shown, reason) = drops[d];
                if let Some(top) = top {
                    self.dropped.push(Refusal {
                        refused: Side::Value(t, shown.clone()),
                        other: Side::Node(top),
                        reason,
                        seen_at,
                        query,
                    });
                }
                d += 1;
            }
            run_nodes.clear();
            run_nodes.extend_from_slice(&nodes[start..]);
            node_ends.push(nodes.len() as u32);
        }
        if rows > 0 {
            self.repeat.remember(
                block.row(rows - 1),
                query,
                &run_nodes,
                run_seen,
                run_dropped,
            );
        }
    }

    /// Adds everything `other` read (identifiers, their times, links and refusals), as if its
    /// rows had been added here. Returns where each of `other`'s nodes is in this graph.
    pub fn absorb(&mut self, other: Resolver) -> Vec<Node> {
        let Resolver {
            ids,
            links,
            dropped,
            ..
        } = other;
        let keys: Vec<Key> = (0..ids.len() as Node)
            .map(|i| {
                let (kind, value) = (ids.kind(i), ids.bytes(i));
                let (first_seen, last_seen) = ids.seen(i);
                Key {
                    kind,
                    value,
                    hash: self.ids.hash(kind, value),
                    first_seen,
                    last_seen,
                }
            })
            .collect();
        let mut nodes = Vec::with_capacity(keys.len());
        self.ids.intern_many(&keys, &mut nodes);
        self.links.extend(links.into_iter().map(|l| Link {
            low: nodes[l.low as usize],
            top: nodes[l.top as usize],
            ..l
        }));
        let side = |s: Side| match s {
            Side::Node(n) => Side::Node(nodes[n as usize]),
            value => value,
        };
        self.dropped.extend(dropped.into_iter().map(|r| Refusal {
            refused: side(r.refused),
            other: side(r.other),
            ..r
        }));
        nodes
    }

    /// Applies the rules to every link and returns the resolved graph.
    pub fn resolve(self) -> Resolution {
        self.resolve_with_shared(|_, _| false)
    }

    /// [`Resolver::resolve`], with the identifiers `known(type, value)` accepts counted as
    /// shared whatever their links here. A value over `max_links` stays over it, since links
    /// are only ever added; a graph of some of the links (see `groups`) is told which values
    /// the graph of all of them found shared.
    pub fn resolve_with_shared(self, known: impl Fn(u8, &str) -> bool) -> Resolution {
        self.prepare_with_shared(known).apply_within(None).0
    }

    /// The links ready to apply: one per pair as first seen, values over `max_links` found,
    /// in time order (ties broken by the identifiers themselves, so arrival order never
    /// matters).
    pub fn prepare(self) -> Prepared {
        self.prepare_with_shared(|_, _| false)
    }

    /// [`Resolver::prepare`], with the values `known` accepts counted as shared (see
    /// [`Resolver::resolve_with_shared`]).
    fn prepare_with_shared(self, known: impl Fn(u8, &str) -> bool) -> Prepared {
        let Resolver {
            rules,
            ids,
            mut links,
            dropped,
            ..
        } = self;
        let n = ids.len();

        // One link per pair, as first seen.
        links.sort_unstable_by(|a, b| {
            (a.low, a.top, a.seen_at, a.query).cmp(&(b.low, b.top, b.seen_at, b.query))
        });
        links.dedup_by(|later, first| later.low == first.low && later.top == first.top);

        // Shared values: linked to more distinct identifiers than their type allows.
        let mut shared = vec![false; n];
        if rules.types.iter().any(|t| t.max_links.is_some()) {
            let mut degree = vec![0u32; n];
            for l in &links {
                degree[l.low as usize] += 1;
                degree[l.top as usize] += 1;
            }
            for (i, d) in degree.iter().enumerate() {
                if let Some(max) = rules.types[ids.kind(i as Node) as usize].max_links {
                    shared[i] = *d > max;
                }
            }
            for (i, s) in shared.iter_mut().enumerate() {
                let n = i as Node;
                if !*s && known(ids.kind(n), ids.value(n)) {
                    *s = true;
                }
            }
        }

        let key = |n: Node| (ids.kind(n), ids.bytes(n));
        links.sort_unstable_by(|a, b| {
            a.seen_at
                .cmp(&b.seen_at)
                .then_with(|| key(a.top).cmp(&key(b.top)))
                .then_with(|| key(a.low).cmp(&key(b.low)))
        });
        Prepared {
            rules,
            ids,
            links,
            shared,
            dropped,
        }
    }
}

/// A graph's links deduplicated, checked against `max_links` and in the order they apply
/// ([`Resolver::prepare`]); [`Prepared::apply`] groups them.
pub struct Prepared {
    rules: Rules,
    ids: Interner,
    links: Vec<Link>,
    shared: Vec<bool>,
    dropped: Vec<Refusal>,
}

impl Prepared {
    /// How many identifiers there are (node ids are below this).
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// True when no identifier was seen.
    pub fn is_empty(&self) -> bool {
        self.ids.len() == 0
    }

    /// How many distinct links there are, shared values' included.
    pub fn link_count(&self) -> usize {
        self.links.len()
    }

    /// The links that can join identifiers: those of no shared value. Blocklisted and
    /// malformed values never became nodes, so these are the links that survive every rule
    /// but the per-type limits.
    pub fn joining_links(&self) -> impl Iterator<Item = (Node, Node)> + '_ {
        self.links
            .iter()
            .filter(|l| !self.shared[l.low as usize] && !self.shared[l.top as usize])
            .map(|l| (l.low, l.top))
    }

    /// Applies the links in order under the per-type limits and returns the resolved graph,
    /// as [`Resolver::resolve`] does.
    pub fn apply(self) -> Resolution {
        self.apply_within(None).0
    }

    /// [`Prepared::apply`], given the connected component of every node over
    /// [`Prepared::joining_links`] with no limits, as a node of that component (one label
    /// per component, e.g. its smallest node).
    ///
    /// A group holding no more values of a limited type than the limit allows takes all of
    /// its links: no union inside it can break a limit. Only the groups over a limit are
    /// resolved link by link here, and their links touch no other group, so applying just
    /// theirs in the same order refuses exactly the links that applying every link would:
    /// the result is [`Prepared::apply`]'s (a test keeps it so). Labels that are not nodes
    /// are an error saying so. Also returns how many identifiers were in groups resolved
    /// link by link.
    pub fn apply_grouped(
        self,
        groups: &[Node],
    ) -> std::result::Result<(Resolution, usize), String> {
        let n = self.ids.len();
        if groups.len() != n {
            return Err(format!(
                "{} component labels for {n} identifiers",
                groups.len()
            ));
        }
        if let Some(bad) = groups.iter().find(|&&c| c as usize >= n) {
            return Err(format!(
                "component label {bad} is not an identifier (there are {n})"
            ));
        }
        Ok(self.apply_within(Some(groups)))
    }

    fn apply_within(self, groups: Option<&[Node]>) -> (Resolution, usize) {
        let Prepared {
            rules,
            ids,
            links,
            shared,
            dropped,
        } = self;
        let n = ids.len();
        let limited: Vec<(u8, u32)> = rules
            .types
            .iter()
            .enumerate()
            .filter_map(|(i, t)| t.limit.map(|l| (i as u8, l)))
            .collect();
        let slot_of = |node: usize| {
            limited
                .iter()
                .position(|(t, _)| *t == ids.kind(node as Node))
        };

        // Per group: whether it must be resolved link by link.
        let over: Option<Vec<bool>> = match groups {
            None => None,
            Some(g) => {
                let w = limited.len();
                let mut counts = vec![0u32; n * w];
                let mut over = vec![false; n];
                for (i, &c) in g.iter().enumerate() {
                    if let Some(slot) = slot_of(i) {
                        let count = &mut counts[c as usize * w + slot];
                        *count += 1;
                        if *count > limited[slot].1 {
                            over[c as usize] = true;
                        }
                    }
                }
                Some(over)
            }
        };
        let exact = |node: Node| match (&over, groups) {
            (Some(over), Some(g)) => over[g[node as usize] as usize],
            _ => true,
        };

        let mut uf = UnionFind::new(n, limited.len());
        for i in 0..n {
            if let Some(slot) = slot_of(i) {
                uf.counts[i * limited.len() + slot] = 1;
            }
        }

        let mut accepted = Vec::with_capacity(links.len());
        let mut refused = dropped;
        for link in links {
            let (low, top) = (link.low as usize, link.top as usize);
            if shared[low] || shared[top] {
                let (bad, other) = if shared[low] {
                    (link.low, link.top)
                } else {
                    (link.top, link.low)
                };
                refused.push(Refusal {
                    refused: Side::Node(bad),
                    other: Side::Node(other),
                    reason: Reason::MaxLinks,
                    seen_at: link.seen_at,
                    query: link.query,
                });
                continue;
            }
            if !exact(link.low) {
                accepted.push(link);
                continue;
            }
            match uf.union_within(link.low, link.top, &limited) {
                Ok(()) => accepted.push(link),
                Err(t) => refused.push(Refusal {
                    refused: Side::Node(link.low),
                    other: Side::Node(link.top),
                    reason: Reason::Limit(t),
                    seen_at: link.seen_at,
                    query: link.query,
                }),
            }
        }

        // One refusal per (refused, other, reason), as first seen.
        refused.sort_by(|a, b| {
            (&a.refused, &a.other, a.reason, a.seen_at, a.query)
                .cmp(&(&b.refused, &b.other, b.reason, b.seen_at, b.query))
        });
        refused.dedup_by(|later, first| {
            later.refused == first.refused
                && later.other == first.other
                && later.reason == first.reason
        });

        // A node of a group taken whole is labelled by the group; the roots of the groups
        // resolved here are nodes of those groups, so no two components share a label.
        let component: Vec<Node> = (0..n as Node)
            .map(|i| match groups {
                Some(g) if !exact(i) => g[i as usize],
                _ => uf.find(i),
            })
            .collect();
        let linked_one_by_one = match groups {
            Some(_) => (0..n as Node).filter(|&i| exact(i)).count(),
            None => n,
        };
        (
            Resolution {
                rules,
                ids,
                shared,
                component,
                accepted,
                refused,
            },
            linked_one_by_one,
        )
    }
}

impl Rules {
    fn clean_for_display(&self, t: u8, raw: &str) -> String {
        normalize(self.types[t as usize].normalize, raw, &self.country)
            .map(Cow::into_owned)
            .unwrap_or_else(|_| raw.to_string())
    }
}

/// Union-find with union by size, path halving, and per-component counts of limited types.
struct UnionFind {
    parent: Vec<Node>,
    size: Vec<u32>,
    counts: Vec<u32>,
    width: usize,
}

impl UnionFind {
    fn new(n: usize, width: usize) -> Self {
        UnionFind {
            parent: (0..n as Node).collect(),
            size: vec![1; n],
            counts: vec![0; n * width],
            width,
        }
    }

    fn find(&mut self, mut x: Node) -> Node {
        while self.parent[x as usize] != x {
            let grand = self.parent[self.parent[x as usize] as usize];
            self.parent[x as usize] = grand;
            x = grand;
        }
        x
    }

    /// Joins the components of `a` and `b` unless a limit would be broken (then the type).
    fn union_within(&mut self, a: Node, b: Node, limited: &[(u8, u32)]) -> Result<(), u8> {
        let (ra, rb) = (self.find(a), self.find(b));
        if ra == rb {
            return Ok(());
        }
        let w = self.width;
        for (slot, (t, limit)) in limited.iter().enumerate() {
            if self.counts[ra as usize * w + slot] + self.counts[rb as usize * w + slot] > *limit {
                return Err(*t);
            }
        }
        let (big, small) = if self.size[ra as usize] >= self.size[rb as usize] {
            (ra, rb)
        } else {
            (rb, ra)
        };
        self.parent[small as usize] = big;
        self.size[big as usize] += self.size[small as usize];
        for slot in 0..w {
            self.counts[big as usize * w + slot] += self.counts[small as usize * w + slot];
        }
        Ok(())
    }
}

/// The resolved graph.
pub struct Resolution {
    rules: Rules,
    ids: Interner,
    shared: Vec<bool>,
    component: Vec<Node>,
    /// Links applied, in the order they were applied.
    pub accepted: Vec<Link>,
    /// Links refused, one per (refused, other, reason).
    pub refused: Vec<Refusal>,
}

impl Resolution {
    /// The rules it was resolved under.
    pub fn rules(&self) -> &Rules {
        &self.rules
    }

    /// How many identifiers were interned (shared ones included).
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// True when no identifier was seen.
    pub fn is_empty(&self) -> bool {
        self.ids.len() == 0
    }

    /// An identifier's type index.
    pub fn kind(&self, n: Node) -> u8 {
        self.ids.kind(n)
    }

    /// An identifier's normalised value.
    pub fn value(&self, n: Node) -> &str {
        self.ids.value(n)
    }

    /// An identifier's normalised value as bytes: what sorts compare (byte order is str
    /// order, without checking the UTF-8 again on every comparison).
    pub fn value_bytes(&self, n: Node) -> &[u8] {
        self.ids.bytes(n)
    }

    /// Every identifier's value as one string array, row `n` holding node `n`'s value: the
    /// interner's arena is already laid out as one (a byte buffer and end offsets), so output
    /// columns are gathered from it with `take` instead of a string per value. `None` when the
    /// values exceed what 32-bit offsets address (2 GiB).
    pub fn value_array(&self) -> Option<arrow::array::StringArray> {
        let ids = &self.ids;
        if ids.bytes.len() > i32::MAX as usize {
            return None;
        }
        let offsets: Vec<i32> = std::iter::once(0)
            .chain(ids.entries.iter().map(|e| (e.start + e.len as u64) as i32))
            .collect();
        arrow::array::StringArray::try_new(
            arrow::buffer::OffsetBuffer::new(offsets.into()),
            arrow::buffer::Buffer::from_slice_ref(&ids.bytes),
            None,
        )
        .ok()
    }

    /// The first eight bytes of an identifier's value, big-endian and zero-padded: ordering
    /// by it never contradicts ordering by the whole value, so sorts compare it first and
    /// read the values only on a tie.
    pub fn value_prefix(&self, n: Node) -> u64 {
        prefix_key(self.value_bytes(n))
    }

    /// When an identifier was first and last seen (`NO_TIME` when never with a time).
    pub fn seen(&self, n: Node) -> (i64, i64) {
        self.ids.seen(n)
    }

    /// The component (profile) an identifier belongs to; `None` for shared values, which link nothing.
    pub fn component(&self, n: Node) -> Option<Node> {
        (!self.shared[n as usize]).then(|| self.component[n as usize])
    }

    /// True when the identifier is shared junk (over `max_links`).
    pub fn is_shared(&self, n: Node) -> bool {
        self.shared[n as usize]
    }

    /// The node of an already normalised value, if it is in the graph.
    pub fn lookup(&self, t: u8, value: &str) -> Option<Node> {
        self.ids.get(t, value)
    }

    /// Type name and value of a side of a refusal.
    pub fn side(&self, side: &Side) -> (&str, String) {
        match side {
            Side::Node(n) => (
                &self.rules.types[self.kind(*n) as usize].name,
                self.value(*n).to_string(),
            ),
            Side::Value(t, v) => (&self.rules.types[*t as usize].name, v.clone()),
        }
    }

    /// Orders identifiers by first seen, then type priority, then value: a profile's "oldest" member.
    pub fn age_order(&self, a: Node, b: Node) -> Ordering {
        self.ids.entries[a as usize]
            .first_seen
            .cmp(&self.ids.entries[b as usize].first_seen)
            .then_with(|| self.kind(a).cmp(&self.kind(b)))
            .then_with(|| self.value_bytes(a).cmp(self.value_bytes(b)))
    }
}

/// The first eight bytes of `b` as a big-endian integer, zero-padded (see
/// [`Resolution::value_prefix`]).
pub fn prefix_key(b: &[u8]) -> u64 {
    let mut head = [0u8; 8];
    let n = b.len().min(8);
    head[..n].copy_from_slice(&b[..n]);
    u64::from_be_bytes(head)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::config::IdentifierConfig;

    /// (name, normaliser, limit, blocklist, max_links)
    type Spec<'a> = (&'a str, Normalize, Option<u64>, &'a [&'a str], Option<u64>);

    pub(crate) fn rules(spec: &[Spec]) -> Rules {
        let identifiers = spec
            .iter()
            .map(|(name, normalize, limit, block, max)| IdentifierConfig {
                name: name.to_string(),
                normalize: *normalize,
                limit: *limit,
                blocklist: block.iter().map(|s| s.to_string()).collect(),
                max_links: *max,
            })
            .collect();
        Rules::from_config(&IdentityConfig {
            identifiers,
            default_country_code: "1".into(),
            probabilistic: Vec::new(),
        })
    }

    fn segment_rules() -> Rules {
        rules(&[
            ("user_id", Normalize::Trim, Some(1), &[], None),
            ("email", Normalize::Email, Some(2), &["test@test.com"], None),
            ("anonymous_id", Normalize::Trim, None, &[], Some(3)),
        ])
    }

    fn groups(r: &Resolution) -> Vec<Vec<String>> {
        let mut by: std::collections::BTreeMap<Node, Vec<String>> = Default::default();
        for n in 0..r.len() as Node {
            if let Some(c) = r.component(n) {
                by.entry(c).or_default().push(format!(
                    "{}:{}",
                    r.rules.types[r.kind(n) as usize].name,
                    r.value(n)
                ));
            }
        }
        let mut out: Vec<Vec<String>> = by
            .into_values()
            .map(|mut g| {
                g.sort();
                g
            })
            .collect();
        out.sort();
        out
    }

    fn add(res: &mut Resolver, row: &[(u8, &str)], t: i64) {
        let mut nodes = Vec::new();
        res.add_row(row, t, 0, &mut nodes);
    }

    #[test]
    fn a_row_links_everything_to_its_highest_priority_identifier() {
        let mut r = Resolver::new(segment_rules());
        add(&mut r, &[(2, "a1"), (1, " Ann@X.com "), (0, "u1")], 1);
        let res = r.resolve();
        assert_eq!(
            groups(&res),
            vec![vec!["anonymous_id:a1", "email:ann@x.com", "user_id:u1"]]
        );
        let tops: Vec<&str> = res.accepted.iter().map(|l| res.value(l.top)).collect();
        assert_eq!(tops, ["u1", "u1"]);
    }

    #[test]
    fn limit_refuses_a_second_user_id_and_records_why() {
        let mut r = Resolver::new(segment_rules());
        add(&mut r, &[(2, "a1"), (0, "u1")], 1);
        add(&mut r, &[(2, "a1"), (0, "u2")], 2);
        let res = r.resolve();
        assert_eq!(
            groups(&res),
            vec![vec!["anonymous_id:a1", "user_id:u1"], vec!["user_id:u2"]]
        );
        assert_eq!(res.refused.len(), 1);
        let refusal = &res.refused[0];
        assert_eq!(refusal.reason, Reason::Limit(0));
        assert_eq!(refusal.reason.describe(res.rules()), "limit: user_id (1)");
        assert_eq!(
            res.side(&refusal.refused),
            ("anonymous_id", "a1".to_string())
        );
        assert_eq!(refusal.seen_at, 2);
    }

    #[test]
    fn links_apply_in_time_order_not_arrival_order() {
        // The later link (u2) arrives first but the earlier one (u1) wins the limit.
        let mut r = Resolver::new(segment_rules());
        add(&mut r, &[(2, "a1"), (0, "u2")], 20);
        add(&mut r, &[(2, "a1"), (0, "u1")], 10);
        let res = r.resolve();
        assert_eq!(
            groups(&res),
            vec![vec!["anonymous_id:a1", "user_id:u1"], vec!["user_id:u2"]]
        );
    }

    #[test]
    fn blocklisted_and_empty_values_link_nothing_and_are_recorded() {
        let mut r = Resolver::new(segment_rules());
        add(&mut r, &[(1, " TEST@test.com"), (2, "a1")], 1);
        add(&mut r, &[(1, " TEST@test.com"), (2, "a2")], 2);
        add(&mut r, &[(0, "  "), (2, "a3")], 3);
        add(&mut r, &[(1, "not an email"), (2, "a3")], 4);
        let res = r.resolve();
        assert_eq!(
            groups(&res),
            vec![
                vec!["anonymous_id:a1"],
                vec!["anonymous_id:a2"],
                vec!["anonymous_id:a3"]
            ]
        );
        let reasons: Vec<(String, Reason)> = res
            .refused
            .iter()
            .map(|f| (res.side(&f.refused).1, f.reason))
            .collect();
        assert!(reasons.contains(&("test@test.com".into(), Reason::Blocklisted)));
        assert!(reasons.contains(&("  ".into(), Reason::Empty)));
        assert!(reasons.contains(&("not an email".into(), Reason::Invalid)));
        assert_eq!(res.refused.len(), 4);
    }

    #[test]
    fn a_value_over_max_links_is_shared_and_links_nothing() {
        let mut r = Resolver::new(segment_rules());
        for (i, u) in ["u1", "u2", "u3", "u4"].iter().enumerate() {
            add(&mut r, &[(2, "kiosk"), (0, u)], i as i64);
        }
        add(&mut r, &[(2, "phone-1"), (0, "u1")], 9);
        let res = r.resolve();
        let kiosk = res.lookup(2, "kiosk").unwrap();
        assert!(res.is_shared(kiosk));
        assert_eq!(res.component(kiosk), None);
        assert_eq!(
            groups(&res),
            vec![
                vec!["anonymous_id:phone-1", "user_id:u1"],
                vec!["user_id:u2"],
                vec!["user_id:u3"],
                vec!["user_id:u4"]
            ]
        );
        assert_eq!(
            res.refused
                .iter()
                .filter(|f| f.reason == Reason::MaxLinks)
                .count(),
            4
        );
    }

    #[test]
    fn limit_counts_are_per_component_not_per_link() {
        // Two emails join via two anonymous ids; a third email would make three.
        let mut r = Resolver::new(segment_rules());
        add(&mut r, &[(1, "e1@x"), (2, "a1")], 1);
        add(&mut r, &[(1, "e2@x"), (2, "a1")], 2);
        add(&mut r, &[(1, "e3@x"), (2, "a1")], 3);
        let res = r.resolve();
        assert_eq!(
            groups(&res),
            vec![
                vec!["anonymous_id:a1", "email:e1@x", "email:e2@x"],
                vec!["email:e3@x"]
            ]
        );
    }

    #[test]
    fn duplicate_links_keep_their_first_time() {
        let mut r = Resolver::new(segment_rules());
        add(&mut r, &[(2, "a1"), (0, "u1")], 50);
        add(&mut r, &[(2, "a1"), (0, "u1")], 5);
        add(&mut r, &[(2, "a1"), (0, "u1")], 70);
        let res = r.resolve();
        assert_eq!(res.accepted.len(), 1);
        assert_eq!(res.accepted[0].seen_at, 5);
        let a1 = res.lookup(2, "a1").unwrap();
        assert_eq!(res.seen(a1), (5, 70));
    }

    /// Everything a resolution says, in identifiers' own terms (node numbers differ between
    /// graphs built in different orders).
    fn described(r: &Resolution) -> Vec<String> {
        let name = |n: Node| format!("{}:{}", r.rules.types[r.kind(n) as usize].name, r.value(n));
        let mut out: Vec<String> = groups(r).into_iter().map(|g| g.join(" ")).collect();
        let mut seen: Vec<String> = (0..r.len() as Node)
            .map(|n| format!("{} seen {:?}", name(n), r.seen(n)))
            .collect();
        seen.sort();
        let mut accepted: Vec<String> = r
            .accepted
            .iter()
            .map(|l| {
                format!(
                    "{} -> {} at {} by {}",
                    name(l.low),
                    name(l.top),
                    l.seen_at,
                    l.query
                )
            })
            .collect();
        accepted.sort();
        let mut refused: Vec<String> = r
            .refused
            .iter()
            .map(|f| {
                format!(
                    "{:?} / {:?}: {} at {} by {}",
                    r.side(&f.refused),
                    r.side(&f.other),
                    f.reason.describe(&r.rules),
                    f.seen_at,
                    f.query
                )
            })
            .collect();
        refused.sort();
        out.extend(seen);
        out.extend(accepted);
        out.extend(refused);
        out
    }

    proptest::proptest! {
        #[test]
        fn rows_added_in_blocks_resolve_as_rows_added_one_by_one(
            rows in proptest::collection::vec(
                (
                    proptest::option::of(0u8..3),
                    proptest::option::of(0u8..6),
                    proptest::option::of(0u8..8),
                    proptest::option::of(0i64..20),
                    1usize..4,
                ),
                0..60,
            ),
            cuts in proptest::collection::vec(0usize..150, 0..4),
            query in 0u16..2,
        ) {
            // Rows come in runs of repeats (as one session's events do), with times that go
            // back as well as forward, so add_row's repeat shortcut is taken and refused.
            let emails = ["a@x.com", " A@X.com", "b@x.com", "test@test.com", "", "c@y.org"];
            let mut specs: Vec<(Vec<(u8, String)>, i64)> = Vec::new();
            for (i, &(u, e, a, t, repeats)) in rows.iter().enumerate() {
                let mut row: Vec<(u8, String)> = Vec::new();
                if let Some(u) = u { row.push((0, format!("u{u}"))); }
                if let Some(e) = e { row.push((1, emails[e as usize].to_string())); }
                if let Some(a) = a { row.push((2, format!("a{a}"))); }
                for k in 0..repeats {
                    let time = t.map_or(NO_TIME, |t| (t + 7 * k as i64 + i as i64) % 25);
                    specs.push((row.clone(), time));
                }
            }
            let mut one = Resolver::new(segment_rules());
            let mut expected: Vec<Vec<Node>> = Vec::new();
            let mut out = Vec::new();
            for (row, time) in &specs {
                let row: Vec<(u8, &str)> = row.iter().map(|(t, v)| (*t, v.as_str())).collect();
                one.add_row(&row, *time, query, &mut out);
                expected.push(out.clone());
            }
            let mut bounds: Vec<usize> = cuts.iter().map(|&c| c.min(specs.len())).collect();
            bounds.push(0);
            bounds.push(specs.len());
            bounds.sort_unstable();
            let mut blocks = Resolver::new(segment_rules());
            let mut got: Vec<Vec<Node>> = Vec::new();
            let (mut nodes, mut ends) = (Vec::new(), Vec::new());
            for w in bounds.windows(2) {
                let mut block = Block::default();
                for (row, time) in &specs[w[0]..w[1]] {
                    block.ids.extend(row.iter().map(|(t, v)| (*t, v.as_str())));
                    block.end_row(*time);
                }
                blocks.add_block(&block, query, &mut nodes, &mut ends);
                let mut start = 0;
                for &end in &ends {
                    got.push(nodes[start..end as usize].to_vec());
                    start = end as usize;
                }
            }
            proptest::prop_assert_eq!(&got, &expected);
            proptest::prop_assert_eq!(&blocks.links, &one.links);
            proptest::prop_assert_eq!(&blocks.dropped, &one.dropped);
            let (a, b) = (one.resolve(), blocks.resolve());
            proptest::prop_assert_eq!(described(&b), described(&a));
            // Node numbers too: events are mapped to nodes by number.
            for n in 0..a.len() as Node {
                proptest::prop_assert_eq!((a.kind(n), a.value(n)), (b.kind(n), b.value(n)));
            }
        }

        #[test]
        fn rows_read_in_parts_and_absorbed_resolve_as_rows_read_in_one(
            rows in proptest::collection::vec(
                (
                    proptest::option::of(0u8..3),
                    proptest::option::of(0u8..6),
                    proptest::option::of(0u8..8),
                    proptest::option::of(0i64..20),
                    0u16..2,
                ),
                0..60,
            ),
            cuts in proptest::collection::vec(0usize..60, 0..3),
        ) {
            let emails = ["a@x.com", " A@X.com", "b@x.com", "test@test.com", "", "c@y.org"];
            let row_of = |&(u, e, a, _, _): &(Option<u8>, Option<u8>, Option<u8>, Option<i64>, u16)| {
                let mut row: Vec<(u8, String)> = Vec::new();
                if let Some(u) = u { row.push((0, format!("u{u}"))); }
                if let Some(e) = e { row.push((1, emails[e as usize].to_string())); }
                if let Some(a) = a { row.push((2, format!("a{a}"))); }
                row
            };
            let feed = |r: &mut Resolver, rows: &[_]| {
                let mut nodes = Vec::new();
                for spec in rows {
                    let row = row_of(spec);
                    let row: Vec<(u8, &str)> = row.iter().map(|(t, v)| (*t, v.as_str())).collect();
                    r.add_row(&row, spec.3.unwrap_or(NO_TIME), spec.4, &mut nodes);
                }
            };
            let mut one = Resolver::new(segment_rules());
            feed(&mut one, &rows);
            let mut bounds: Vec<usize> = cuts.iter().map(|&c| c.min(rows.len())).collect();
            bounds.push(0);
            bounds.push(rows.len());
            bounds.sort_unstable();
            let mut merged: Option<Resolver> = None;
            for w in bounds.windows(2) {
                let mut part = Resolver::new(segment_rules());
                feed(&mut part, &rows[w[0]..w[1]]);
                match &mut merged {
                    None => merged = Some(part),
                    Some(m) => {
                        let before = part.ids.len();
                        let nodes = m.absorb(part);
                        proptest::prop_assert_eq!(nodes.len(), before);
                    }
                }
            }
            let merged = merged.expect("at least one part");
            proptest::prop_assert_eq!(described(&merged.resolve()), described(&one.resolve()));
        }
    }
}

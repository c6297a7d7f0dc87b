//! The identity intake as it was before it took rows a batch at a time: identifiers interned
//! one row at a time into a hashbrown table over arrays (types, value ends, first and last
//! seen, one array each), with the previous-row shortcut. Kept only as the benchmark's
//! baseline, so `cargo bench --bench identity` shows what the batched, prefetched intake gains
//! on each data set; it builds links but never resolves them.

use std::hash::BuildHasher;

use hashbrown::HashTable;
use tessera::stages::identity::graph::{Node, Rules, NO_TIME};

/// The old intake: what `Resolver::add_row` did up to the links.
pub struct LegacyIntake {
    rules: Rules,
    table: HashTable<Node>,
    bytes: Vec<u8>,
    ends: Vec<u64>,
    types: Vec<u8>,
    hasher: foldhash::fast::FixedState,
    first_seen: Vec<i64>,
    last_seen: Vec<i64>,
    /// (low, top, seen_at)
    pub links: Vec<(Node, Node, i64)>,
    /// (type, shown value, top, seen_at)
    pub dropped: Vec<(u8, String, Node, i64)>,
    last: Vec<(u8, String)>,
    last_nodes: Vec<Node>,
    last_seen_at: i64,
    last_dropped: bool,
    last_valid: bool,
}

impl LegacyIntake {
    pub fn new(rules: Rules) -> Self {
        LegacyIntake {
            rules,
            table: HashTable::new(),
            bytes: Vec::new(),
            ends: Vec::new(),
            types: Vec::new(),
            hasher: foldhash::fast::FixedState::with_seed(0x7e55e7a),
            first_seen: Vec::new(),
            last_seen: Vec::new(),
            links: Vec::new(),
            dropped: Vec::new(),
            last: Vec::new(),
            last_nodes: Vec::new(),
            last_seen_at: 0,
            last_dropped: false,
            last_valid: false,
        }
    }

    /// Identifiers interned.
    pub fn len(&self) -> usize {
        self.types.len()
    }

    fn bytes_of(&self, n: Node) -> &[u8] {
        let n = n as usize;
        let start = if n == 0 { 0 } else { self.ends[n - 1] as usize };
        &self.bytes[start..self.ends[n] as usize]
    }

    fn intern(&mut self, t: u8, v: &str) -> Node {
        let v = v.as_bytes();
        let h = self.hasher.hash_one((t, v));
        if let Some(&n) = self
            .table
            .find(h, |&n| self.types[n as usize] == t && self.bytes_of(n) == v)
        {
            return n;
        }
        let n = self.types.len() as Node;
        self.bytes.extend_from_slice(v);
        self.ends.push(self.bytes.len() as u64);
        self.types.push(t);
        let (types, bytes, ends, hasher) = (&self.types, &self.bytes, &self.ends, &self.hasher);
        self.table.insert_unique(h, n, |&m| {
            let m = m as usize;
            let start = if m == 0 { 0 } else { ends[m - 1] as usize };
            hasher.hash_one((types[m], &bytes[start..ends[m] as usize]))
        });
        n
    }

    fn touch(&mut self, n: Node, seen_at: i64) {
        let i = n as usize;
        self.first_seen[i] = self.first_seen[i].min(seen_at);
        if seen_at != NO_TIME && (self.last_seen[i] == NO_TIME || seen_at > self.last_seen[i]) {
            self.last_seen[i] = seen_at;
        }
    }

    /// One row, identifiers in priority order.
    pub fn add_row(&mut self, row: &[(u8, &str)], seen_at: i64, nodes: &mut Vec<Node>) {
        nodes.clear();
        let repeat = self.last_valid
            && self.last.len() == row.len()
            && self
                .last
                .iter()
                .zip(row)
                .all(|((a, x), (b, y))| a == b && x == y);
        if repeat {
            nodes.extend_from_slice(&self.last_nodes);
            for &n in nodes.iter() {
                self.touch(n, seen_at);
            }
            if seen_at >= self.last_seen_at && !self.last_dropped {
                return;
            }
        }
        let mut dropped: Vec<(u8, String)> = Vec::new();
        for &(t, raw) in row {
            match self.rules.clean(t, raw) {
                Ok(value) => {
                    let n = self.intern(t, &value);
                    if n as usize == self.first_seen.len() {
                        self.first_seen.push(seen_at);
                        self.last_seen.push(seen_at);
                    } else {
                        self.touch(n, seen_at);
                    }
                    if !nodes.contains(&n) {
                        nodes.push(n);
                    }
                }
                Err(_) => dropped.push((t, raw.to_string())),
            }
        }
        self.last.truncate(row.len());
        for (i, (t, v)) in row.iter().enumerate() {
            match self.last.get_mut(i) {
                Some(slot) => {
                    slot.0 = *t;
                    slot.1.clear();
                    slot.1.push_str(v);
                }
                None => self.last.push((*t, v.to_string())),
            }
        }
        self.last_nodes.clear();
        self.last_nodes.extend_from_slice(nodes);
        self.last_seen_at = seen_at;
        self.last_dropped = !dropped.is_empty();
        self.last_valid = true;
        let Some(&top) = nodes.first() else { return };
        for &low in &nodes[1..] {
            self.links.push((low, top, seen_at));
        }
        for (t, value) in dropped {
            self.dropped.push((t, value, top, seen_at));
        }
    }
}

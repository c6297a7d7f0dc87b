//! Pairwise precision and recall of `identity_graph` against a generated truth.

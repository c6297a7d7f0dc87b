//! `tessera explain TYPE:VALUE`: why an identifier is in its profile, as a readable tree.

//! Key management.

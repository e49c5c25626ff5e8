//! Shared helpers for cap's end-to-end tests.

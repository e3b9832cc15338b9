//! End-to-end tests of the whole nfcpay system live in `tests/tests/`.

-- The nfcpay ledger, SQLite dialect. Keep equivalent to ../../postgres/*/up.sql.
-- Money is i64 minor units, times are i64 milliseconds since the Unix epoch.

CREATE TABLE accounts (
    id            TEXT PRIMARY KEY NOT NULL,
    currency      TEXT NOT NULL CHECK (length(currency) = 3),
    balance_minor INTEGER NOT NULL,
    -- The lowest balance allowed; NULL only for the per-currency funding accounts.
    limit_minor   INTEGER,
    created_at_ms INTEGER NOT NULL,
    CHECK (limit_minor IS NULL OR balance_minor >= limit_minor)
) STRICT;

CREATE TABLE transfers (
    id            INTEGER PRIMARY KEY,
    kind          TEXT NOT NULL CHECK (kind IN ('funding', 'settlement')),
    txn_id        BLOB UNIQUE CHECK (txn_id IS NULL OR length(txn_id) = 16),
    amount_minor  INTEGER NOT NULL CHECK (amount_minor > 0),
    currency      TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL
) STRICT;

CREATE TABLE postings (
    id                  INTEGER PRIMARY KEY,
    transfer_id         INTEGER NOT NULL REFERENCES transfers (id),
    account_id          TEXT NOT NULL REFERENCES accounts (id),
    amount_minor        INTEGER NOT NULL CHECK (amount_minor <> 0),
    balance_after_minor INTEGER NOT NULL,
    created_at_ms       INTEGER NOT NULL
) STRICT;
CREATE INDEX postings_by_account ON postings (account_id, id);
CREATE INDEX postings_by_transfer ON postings (transfer_id);

CREATE TABLE terminals (
    id                     TEXT PRIMARY KEY NOT NULL,
    account_id             TEXT NOT NULL REFERENCES accounts (id),
    initial_key_id         TEXT NOT NULL UNIQUE CHECK (length(initial_key_id) = 16),
    state                  TEXT NOT NULL CHECK (state IN ('pending', 'active', 'suspended', 'revoked')),
    -- SHA-256 of the one-time enrollment code (never the code); NULL once redeemed.
    enrollment_code_sha256 BLOB CHECK (enrollment_code_sha256 IS NULL OR length(enrollment_code_sha256) = 32),
    code_expires_at_ms     INTEGER NOT NULL,
    enrolled_at_ms         INTEGER,
    certificate_serial     TEXT,
    highest_counter        INTEGER NOT NULL DEFAULT 0,
    created_at_ms          INTEGER NOT NULL
) STRICT;

-- Replay protection: a KSN counter is accepted at most once per terminal.
CREATE TABLE used_counters (
    terminal_id     TEXT NOT NULL REFERENCES terminals (id),
    counter         INTEGER NOT NULL CHECK (counter > 0),
    txn_id          BLOB NOT NULL CHECK (length(txn_id) = 16),
    half            TEXT NOT NULL CHECK (half IN ('A', 'B')),
    envelope_sha256 BLOB NOT NULL CHECK (length(envelope_sha256) = 32),
    used_at_ms      INTEGER NOT NULL,
    PRIMARY KEY (terminal_id, counter)
) STRICT;

CREATE TABLE transactions (
    txn_id              BLOB PRIMARY KEY NOT NULL CHECK (length(txn_id) = 16),
    status              TEXT NOT NULL CHECK (status IN ('pending', 'settled', 'expired')),
    expires_at_ms       INTEGER NOT NULL,
    created_at_ms       INTEGER NOT NULL,
    -- Half A: the payee's request.
    a_terminal_id       TEXT REFERENCES terminals (id),
    a_account_id        TEXT REFERENCES accounts (id),
    a_ksn               BLOB CHECK (a_ksn IS NULL OR length(a_ksn) = 12),
    a_envelope_sha256   BLOB CHECK (a_envelope_sha256 IS NULL OR length(a_envelope_sha256) = 32),
    a_request_digest    BLOB CHECK (a_request_digest IS NULL OR length(a_request_digest) = 32),
    a_amount_minor      INTEGER,
    a_currency          TEXT,
    a_received_at_ms    INTEGER,
    -- Half B: the payer's instruction.
    b_terminal_id       TEXT REFERENCES terminals (id),
    b_account_id        TEXT REFERENCES accounts (id),
    b_ksn               BLOB CHECK (b_ksn IS NULL OR length(b_ksn) = 12),
    b_envelope_sha256   BLOB CHECK (b_envelope_sha256 IS NULL OR length(b_envelope_sha256) = 32),
    b_request_digest    BLOB CHECK (b_request_digest IS NULL OR length(b_request_digest) = 32),
    b_payee_terminal_id TEXT,
    b_amount_minor      INTEGER,
    b_currency          TEXT,
    b_received_at_ms    INTEGER,
    -- Settlement.
    settlement_id       INTEGER UNIQUE REFERENCES transfers (id),
    settled_at_ms       INTEGER,
    expired_at_ms       INTEGER,
    CHECK (a_terminal_id IS NOT NULL OR b_terminal_id IS NOT NULL),
    CHECK ((a_terminal_id IS NULL) = (a_envelope_sha256 IS NULL)),
    CHECK ((b_terminal_id IS NULL) = (b_envelope_sha256 IS NULL)),
    CHECK (status <> 'settled' OR (a_terminal_id IS NOT NULL AND b_terminal_id IS NOT NULL
                                   AND settlement_id IS NOT NULL AND settled_at_ms IS NOT NULL)),
    CHECK (status = 'settled' OR settlement_id IS NULL)
) STRICT;
CREATE INDEX transactions_pending_by_expiry ON transactions (status, expires_at_ms);

-- Append-only, hash-chained: hash = SHA-256(prev_hash || canonical record bytes).
CREATE TABLE audit_log (
    seq       INTEGER PRIMARY KEY NOT NULL CHECK (seq > 0),
    at_ms     INTEGER NOT NULL,
    kind      TEXT NOT NULL,
    subject   TEXT NOT NULL,
    details   TEXT NOT NULL,
    prev_hash BLOB NOT NULL CHECK (length(prev_hash) = 32),
    hash      BLOB NOT NULL CHECK (length(hash) = 32)
) STRICT;
CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log
BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END;
CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log
BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END;

-- The chain's head: one row, updated by every append; writers serialize on it.
CREATE TABLE audit_head (
    id   INTEGER PRIMARY KEY NOT NULL CHECK (id = 1),
    seq  INTEGER NOT NULL,
    hash BLOB NOT NULL CHECK (length(hash) = 32)
) STRICT;
INSERT INTO audit_head (id, seq, hash) VALUES (1, 0, zeroblob(32));

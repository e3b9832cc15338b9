-- One audit chain per writer instead of one chain behind one head row (see docs/ledger.md).
-- Keep equivalent to ../../postgres/*/up.sql.

CREATE TABLE audit_chains (
    id             INTEGER PRIMARY KEY NOT NULL CHECK (id > 0),
    head_seq       INTEGER NOT NULL CHECK (head_seq >= 0),
    head_hash      BLOB NOT NULL CHECK (length(head_hash) = 32),
    -- The writer appending to the chain, until lease_until_ms; NULL when released.
    lease_owner    TEXT,
    lease_until_ms INTEGER NOT NULL,
    created_at_ms  INTEGER NOT NULL
) STRICT;
-- The chain so far becomes chain 1, free to be resumed.
INSERT INTO audit_chains (id, head_seq, head_hash, lease_owner, lease_until_ms, created_at_ms)
    SELECT 1, seq, hash, NULL, 0, 0 FROM audit_head;
DROP TABLE audit_head;

DROP TRIGGER audit_log_no_update;
DROP TRIGGER audit_log_no_delete;
ALTER TABLE audit_log RENAME TO audit_log_single_chain;
CREATE TABLE audit_log (
    chain_id  INTEGER NOT NULL REFERENCES audit_chains (id),
    seq       INTEGER NOT NULL CHECK (seq > 0),
    at_ms     INTEGER NOT NULL,
    kind      TEXT NOT NULL,
    subject   TEXT NOT NULL,
    details   TEXT NOT NULL,
    prev_hash BLOB NOT NULL CHECK (length(prev_hash) = 32),
    hash      BLOB NOT NULL CHECK (length(hash) = 32),
    PRIMARY KEY (chain_id, seq)
) STRICT, WITHOUT ROWID;
INSERT INTO audit_log (chain_id, seq, at_ms, kind, subject, details, prev_hash, hash)
    SELECT 1, seq, at_ms, kind, subject, details, prev_hash, hash FROM audit_log_single_chain;
DROP TABLE audit_log_single_chain;
CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log
BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END;
CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log
BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END;

-- Signed checkpoints of every chain's head, written by the daemons (see docs/ledger.md).
CREATE TABLE audit_checkpoints (
    id            INTEGER PRIMARY KEY NOT NULL,
    at_ms         INTEGER NOT NULL,
    -- One line per chain: "<chain_id> <seq> <hash as 64 hex digits>\n", by chain.
    heads         TEXT NOT NULL,
    key_label     TEXT NOT NULL,
    -- ECDSA P-256 over SHA-256 of the checkpoint message, r || s.
    signature     BLOB NOT NULL CHECK (length(signature) = 64)
) STRICT;
CREATE TRIGGER audit_checkpoints_no_update BEFORE UPDATE ON audit_checkpoints
BEGIN SELECT RAISE(ABORT, 'audit_checkpoints is append-only'); END;
CREATE TRIGGER audit_checkpoints_no_delete BEFORE DELETE ON audit_checkpoints
BEGIN SELECT RAISE(ABORT, 'audit_checkpoints is append-only'); END;

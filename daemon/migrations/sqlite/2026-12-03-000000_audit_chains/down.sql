-- Only a log with a single chain can go back.
DROP TABLE audit_checkpoints;
CREATE TABLE audit_head (
    id   INTEGER PRIMARY KEY NOT NULL CHECK (id = 1),
    seq  INTEGER NOT NULL,
    hash BLOB NOT NULL CHECK (length(hash) = 32)
) STRICT;
INSERT INTO audit_head (id, seq, hash) SELECT 1, head_seq, head_hash FROM audit_chains WHERE id = 1;
DROP TRIGGER audit_log_no_update;
DROP TRIGGER audit_log_no_delete;
ALTER TABLE audit_log RENAME TO audit_log_chains;
CREATE TABLE audit_log (
    seq       INTEGER PRIMARY KEY NOT NULL CHECK (seq > 0),
    at_ms     INTEGER NOT NULL,
    kind      TEXT NOT NULL,
    subject   TEXT NOT NULL,
    details   TEXT NOT NULL,
    prev_hash BLOB NOT NULL CHECK (length(prev_hash) = 32),
    hash      BLOB NOT NULL CHECK (length(hash) = 32)
) STRICT;
INSERT INTO audit_log SELECT seq, at_ms, kind, subject, details, prev_hash, hash
    FROM audit_log_chains WHERE chain_id = 1;
DROP TABLE audit_log_chains;
DROP TABLE audit_chains;
CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log
BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END;
CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log
BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END;

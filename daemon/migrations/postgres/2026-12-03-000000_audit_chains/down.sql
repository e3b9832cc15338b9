-- Only a log with a single chain can go back.
DROP TABLE audit_checkpoints;
CREATE TABLE audit_head (
    id   INTEGER PRIMARY KEY NOT NULL CHECK (id = 1),
    seq  BIGINT NOT NULL,
    hash BYTEA NOT NULL CHECK (octet_length(hash) = 32)
);
INSERT INTO audit_head (id, seq, hash) SELECT 1, head_seq, head_hash FROM audit_chains WHERE id = 1;
ALTER TABLE audit_log DISABLE TRIGGER audit_log_no_update;
DELETE FROM audit_log WHERE chain_id <> 1;
ALTER TABLE audit_log ENABLE TRIGGER audit_log_no_update;
ALTER TABLE audit_log DROP CONSTRAINT audit_log_pkey;
ALTER TABLE audit_log DROP COLUMN chain_id;
ALTER TABLE audit_log ADD PRIMARY KEY (seq);
DROP TABLE audit_chains;

-- One audit chain per writer instead of one chain behind one head row (see docs/ledger.md).
-- Keep equivalent to ../../sqlite/*/up.sql.

CREATE TABLE audit_chains (
    id             BIGINT PRIMARY KEY NOT NULL CHECK (id > 0),
    head_seq       BIGINT NOT NULL CHECK (head_seq >= 0),
    head_hash      BYTEA NOT NULL CHECK (octet_length(head_hash) = 32),
    -- The writer appending to the chain, until lease_until_ms; NULL when released.
    lease_owner    TEXT,
    lease_until_ms BIGINT NOT NULL,
    created_at_ms  BIGINT NOT NULL
);
-- The chain so far becomes chain 1, free to be resumed.
INSERT INTO audit_chains (id, head_seq, head_hash, lease_owner, lease_until_ms, created_at_ms)
    SELECT 1, seq, hash, NULL, 0, 0 FROM audit_head;
DROP TABLE audit_head;

ALTER TABLE audit_log ADD COLUMN chain_id BIGINT NOT NULL DEFAULT 1 REFERENCES audit_chains (id);
ALTER TABLE audit_log ALTER COLUMN chain_id DROP DEFAULT;
ALTER TABLE audit_log DROP CONSTRAINT audit_log_pkey;
ALTER TABLE audit_log ADD PRIMARY KEY (chain_id, seq);

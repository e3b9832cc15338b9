//! The append-only, hash-chained audit log.
//!
//! Record `n` stores `hash_n = SHA-256(hash_{n-1} ‖ record_bytes_n)`, with `hash_0` = 32 zero
//! bytes, and the one-row `audit_head` table holds the last `(seq, hash)`. The canonical record
//! bytes are `seq (u64 BE) ‖ at_ms (i64 BE) ‖ len (u32 BE) ‖ kind ‖ len ‖ subject ‖ len ‖
//! details`, so no two different records share an encoding. Changing, inserting, reordering or
//! removing a record breaks the chain at that record; removing the newest ones disagrees with
//! the head.

use diesel::prelude::*;
use sha2::{Digest as _, Sha256};

use super::StorageError;
use super::connection::AnyConnection;
use super::model::{AuditBreak, AuditReport};
use super::schema::{audit_head, audit_log};

/// The chain's first `prev_hash`.
pub const GENESIS_HASH: [u8; 32] = [0; 32];
/// Records read per query while verifying.
const VERIFY_PAGE_RECORDS: i64 = 1000;
/// The single row of `audit_head`.
const HEAD_ROW_ID: i32 = 1;

/// The canonical bytes of a record (without its hashes).
pub fn record_bytes(seq: i64, at_ms: i64, kind: &str, subject: &str, details: &str) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(16 + 12 + kind.len() + subject.len() + details.len());
    bytes.extend_from_slice(&seq.to_be_bytes());
    bytes.extend_from_slice(&at_ms.to_be_bytes());
    for field in [kind, subject, details] {
        // Fields are far below 4 GiB (identifiers and small JSON documents).
        let length = u32::try_from(field.len()).unwrap_or(u32::MAX);
        bytes.extend_from_slice(&length.to_be_bytes());
        bytes.extend_from_slice(field.as_bytes());
    }
    bytes
}

/// `SHA-256(prev_hash ‖ record bytes)`.
pub fn chain_hash(prev_hash: &[u8; 32], record: &[u8]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(prev_hash);
    hasher.update(record);
    hasher.finalize().into()
}

fn hash32(what: &str, bytes: Vec<u8>) -> Result<[u8; 32], StorageError> {
    bytes
        .try_into()
        .map_err(|_| StorageError::corrupt(format!("{what} is not 32 bytes")))
}

/// Appends one record inside the caller's transaction. The writer holds the head's lock
/// for the whole batch (see `writer`), so appends never interleave.
pub(crate) fn append(
    connection: &mut AnyConnection,
    at_ms: i64,
    kind: &str,
    subject: &str,
    details: &serde_json::Value,
) -> Result<i64, StorageError> {
    let (head_seq, head_hash): (i64, Vec<u8>) = audit_head::table
        .find(HEAD_ROW_ID)
        .select((audit_head::seq, audit_head::hash))
        .first(connection)?;
    let prev_hash = hash32("audit head hash", head_hash)?;
    let seq = head_seq + 1;
    let details = details.to_string();
    let hash = chain_hash(
        &prev_hash,
        &record_bytes(seq, at_ms, kind, subject, &details),
    );
    diesel::insert_into(audit_log::table)
        .values((
            audit_log::seq.eq(seq),
            audit_log::at_ms.eq(at_ms),
            audit_log::kind.eq(kind),
            audit_log::subject.eq(subject),
            audit_log::details.eq(&details),
            audit_log::prev_hash.eq(prev_hash.as_slice()),
            audit_log::hash.eq(hash.as_slice()),
        ))
        .execute(connection)?;
    diesel::update(audit_head::table.find(HEAD_ROW_ID))
        .set((
            audit_head::seq.eq(seq),
            audit_head::hash.eq(hash.as_slice()),
        ))
        .execute(connection)?;
    Ok(seq)
}

type AuditRow = (i64, i64, String, String, String, Vec<u8>, Vec<u8>);

/// Walks the whole chain and reports the first broken link.
pub(crate) fn verify(connection: &mut AnyConnection) -> Result<AuditReport, StorageError> {
    let mut expected_seq = 1_i64;
    let mut prev_hash = GENESIS_HASH;
    let mut records = 0_u64;
    let broken = |seq, reason, records, head_hash| {
        Ok(AuditReport {
            records,
            head_hash,
            first_break: Some(AuditBreak { seq, reason }),
        })
    };
    loop {
        let page: Vec<AuditRow> = audit_log::table
            .filter(audit_log::seq.ge(expected_seq))
            .order(audit_log::seq.asc())
            .limit(VERIFY_PAGE_RECORDS)
            .select((
                audit_log::seq,
                audit_log::at_ms,
                audit_log::kind,
                audit_log::subject,
                audit_log::details,
                audit_log::prev_hash,
                audit_log::hash,
            ))
            .load(connection)?;
        if page.is_empty() {
            break;
        }
        for (seq, at_ms, kind, subject, details, stored_prev, stored_hash) in page {
            if seq != expected_seq {
                return broken(expected_seq, "record missing", records, prev_hash);
            }
            if stored_prev.as_slice() != prev_hash.as_slice() {
                return broken(
                    seq,
                    "prev_hash is not the previous record's hash",
                    records,
                    prev_hash,
                );
            }
            let hash = chain_hash(
                &prev_hash,
                &record_bytes(seq, at_ms, &kind, &subject, &details),
            );
            if stored_hash.as_slice() != hash.as_slice() {
                return broken(seq, "hash does not match the record", records, prev_hash);
            }
            prev_hash = hash;
            records += 1;
            expected_seq += 1;
        }
    }
    let (head_seq, head_hash): (i64, Vec<u8>) = audit_head::table
        .find(HEAD_ROW_ID)
        .select((audit_head::seq, audit_head::hash))
        .first(connection)?;
    if head_seq != expected_seq - 1 || head_hash.as_slice() != prev_hash.as_slice() {
        return broken(
            head_seq.max(expected_seq),
            "the head does not match the last record (records removed)",
            records,
            prev_hash,
        );
    }
    Ok(AuditReport {
        records,
        head_hash: prev_hash,
        first_break: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_bytes_are_length_prefixed() {
        let bytes = record_bytes(1, 2, "k", "s", "{}");
        assert_eq!(
            bytes,
            [
                &1_i64.to_be_bytes()[..],
                &2_i64.to_be_bytes(),
                &[0, 0, 0, 1, b'k', 0, 0, 0, 1, b's', 0, 0, 0, 2, b'{', b'}'],
            ]
            .concat()
        );
        // Moving a byte between fields changes the encoding.
        assert_ne!(
            record_bytes(1, 2, "ab", "c", ""),
            record_bytes(1, 2, "a", "bc", "")
        );
    }
}

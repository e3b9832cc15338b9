//! The append-only, hash-chained audit log: one chain per writer, so writers never wait for
//! each other to append.
//!
//! Every writer (the group-commit thread of one `Storage`: a daemon, or an `nfcpay-admin`
//! run) appends to a chain of its own, claimed by a lease in `audit_chains` when it first
//! writes: it resumes a chain whose lease has run out, or starts a new one. Record `n` of chain
//! `c` stores `hash_n = SHA-256(hash_{n-1} ‖ record_bytes_n)`, with `hash_0` the chain's
//! [`genesis_hash`], and the chain's row holds its last `(seq, hash)`. The canonical record
//! bytes are `seq (u64 BE) ‖ at_ms (i64 BE) ‖ len (u32 BE) ‖ kind ‖ len ‖ subject ‖ len ‖
//! details`, so no two different records share an encoding. Changing, inserting, reordering or
//! removing a record breaks its chain at that record; removing the newest ones disagrees with
//! the chain's head.
//!
//! A batch's records are written with one multi-row `INSERT` and one head update that names
//! the head it read (`WHERE head_seq = … AND lease_owner = …`): if another process took the
//! chain over (our lease ran out while we stalled), the update changes nothing and the whole
//! batch is rolled back and run again on a freshly claimed chain.
//!
//! A chain verifies on its own, so someone with write access could rewrite a whole chain and
//! its head consistently. Checkpoints catch that: every so often (and when it stops) a daemon
//! signs every chain's head with a key in the HSM ([`checkpoint_message`]) and stores the
//! signature in `audit_checkpoints`; verifying checks each checkpoint's signature and that every
//! head it names is still on its chain.

use diesel::prelude::*;
use sha2::{Digest as _, Sha256};

use super::StorageError;
use super::connection::AnyConnection;
use super::model::{AuditBreak, AuditReport, ChainHead};
use super::schema::{audit_chains, audit_checkpoints, audit_log};
use super::sql::{Statement, Value, Writes};

/// The `prev_hash` of chain 1's first record (the chain from before chains existed).
pub const GENESIS_HASH: [u8; 32] = [0; 32];
/// How long a claimed chain stays its writer's without being renewed (ms).
pub const CHAIN_LEASE_MS: i64 = 30_000;
/// Records read per query while verifying.
const VERIFY_PAGE_RECORDS: i64 = 1000;
/// Domain separation of the genesis hashes of chains after the first.
const GENESIS_CONTEXT: &[u8] = b"nfcpay audit chain genesis";
/// How many times claiming a chain is tried when another process claims at the same moment.
const CLAIM_ATTEMPTS_MAX: u32 = 8;

/// The `prev_hash` of a chain's first record: chain 1 keeps the zero hash it always had; every
/// later chain starts at `SHA-256("nfcpay audit chain genesis" ‖ chain_id (i64 BE))`, so no
/// chain's records verify as another's.
pub fn genesis_hash(chain_id: i64) -> [u8; 32] {
    if chain_id == 1 {
        return GENESIS_HASH;
    }
    let mut hasher = Sha256::new();
    hasher.update(GENESIS_CONTEXT);
    hasher.update(chain_id.to_be_bytes());
    hasher.finalize().into()
}

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

/// One record waiting for its place in the writer's chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Record {
    at_ms: i64,
    kind: &'static str,
    subject: String,
    details: String,
}

/// The records a job asks for; the writer appends them to its chain in the same commit as the
/// job's rows, and drops them if the job is refused.
#[derive(Debug, Default)]
pub(crate) struct AuditLog {
    records: Vec<Record>,
}

impl AuditLog {
    /// Asks for one record.
    pub(crate) fn record(
        &mut self,
        at_ms: i64,
        kind: &'static str,
        subject: &str,
        details: &serde_json::Value,
    ) {
        self.records.push(Record {
            at_ms,
            kind,
            subject: subject.to_owned(),
            details: details.to_string(),
        });
    }

    /// Moves every record of `other` to the end of this log.
    pub(crate) fn append(&mut self, other: &mut AuditLog) {
        self.records.append(&mut other.records);
    }
}

/// The chain a writer appends to, as it stands in the database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Chain {
    pub(crate) head: ChainHead,
    owner: String,
}

impl Chain {
    /// The same chain with its head moved to `head` (after a commit).
    pub(crate) fn advanced(self, head: ChainHead) -> Self {
        Self { head, ..self }
    }
}

/// Claims a chain for `owner`, inside the caller's transaction: the one it holds already, else
/// the lowest-numbered chain whose lease ran out, else a new one.
pub(crate) fn claim(
    connection: &mut AnyConnection,
    owner: &str,
    now_ms: i64,
) -> Result<Chain, StorageError> {
    type ChainRow = (i64, i64, Vec<u8>);
    let columns = (
        audit_chains::id,
        audit_chains::head_seq,
        audit_chains::head_hash,
    );
    let mine: Option<ChainRow> = audit_chains::table
        .filter(audit_chains::lease_owner.eq(owner))
        .order(audit_chains::id.asc())
        .select(columns)
        .first(connection)
        .optional()?;
    let free: Option<ChainRow> = match mine {
        Some(row) => Some(row),
        None => audit_chains::table
            .filter(audit_chains::lease_until_ms.lt(now_ms))
            .order(audit_chains::id.asc())
            .select(columns)
            .first(connection)
            .optional()?,
    };
    let lease_until_ms = now_ms + CHAIN_LEASE_MS;
    if let Some((id, seq, hash)) = free {
        let taken = diesel::update(
            audit_chains::table
                .find(id)
                .filter(audit_chains::head_seq.eq(seq))
                .filter(
                    audit_chains::lease_until_ms
                        .lt(now_ms)
                        .or(audit_chains::lease_owner.eq(owner)),
                ),
        )
        .set((
            audit_chains::lease_owner.eq(owner),
            audit_chains::lease_until_ms.eq(lease_until_ms),
        ))
        .execute(connection)?;
        if taken != 1 {
            return Err(lost_chain());
        }
        return Ok(Chain {
            head: ChainHead {
                chain_id: id,
                seq,
                hash: hash32("audit chain head hash", hash)?,
            },
            owner: owner.to_owned(),
        });
    }
    let last: Option<i64> = audit_chains::table
        .select(diesel::dsl::max(audit_chains::id))
        .first(connection)?;
    let id = last.unwrap_or(0) + 1;
    let genesis = genesis_hash(id);
    diesel::insert_into(audit_chains::table)
        .values((
            audit_chains::id.eq(id),
            audit_chains::head_seq.eq(0_i64),
            audit_chains::head_hash.eq(genesis.as_slice()),
            audit_chains::lease_owner.eq(owner),
            audit_chains::lease_until_ms.eq(lease_until_ms),
            audit_chains::created_at_ms.eq(now_ms),
        ))
        .execute(connection)?;
    Ok(Chain {
        head: ChainHead {
            chain_id: id,
            seq: 0,
            hash: genesis,
        },
        owner: owner.to_owned(),
    })
}

/// How many times [`claim`] may be run again after losing a race with another claimer.
pub(crate) const fn claim_attempts_max() -> u32 {
    CLAIM_ATTEMPTS_MAX
}

/// The chain was taken over (or advanced) by another process: the batch must run again.
fn lost_chain() -> StorageError {
    StorageError::Database(diesel::result::Error::DatabaseError(
        diesel::result::DatabaseErrorKind::SerializationFailure,
        Box::new(String::from(
            "the audit chain was claimed by another writer",
        )),
    ))
}

/// Appends `log`'s records to `chain` and moves its head and lease, inside the caller's
/// transaction: two statements, whatever the number of records. Returns the new head; the
/// caller adopts it only once the transaction has committed. Counts its statements into
/// `statements`.
pub(crate) fn append(
    connection: &mut AnyConnection,
    chain: &Chain,
    log: &AuditLog,
    now_ms: i64,
    statements: &mut u32,
) -> Result<ChainHead, StorageError> {
    let mut writes = Writes::default();
    let head = queue_append(&mut writes, chain, log, now_ms);
    *statements += writes.statements_on(connection);
    writes.execute_in(connection)?;
    Ok(head)
}

/// [`append`], queued on `writes` (to run with the batch's other writes): the records' insert
/// and the move of the chain's head, which fails the writes with [`lost_chain`] if another
/// writer moved the head or took the lease. Returns the new head.
pub(crate) fn queue_append(
    writes: &mut Writes,
    chain: &Chain,
    log: &AuditLog,
    now_ms: i64,
) -> ChainHead {
    let mut head = chain.head.clone();
    if !log.records.is_empty() {
        let mut insert = Statement::new(
            "INSERT INTO audit_log \
             (chain_id, seq, at_ms, kind, subject, details, prev_hash, hash) ",
        );
        let mut rows = Vec::with_capacity(log.records.len());
        for record in &log.records {
            let seq = head.seq + 1;
            let hash = chain_hash(
                &head.hash,
                &record_bytes(
                    seq,
                    record.at_ms,
                    record.kind,
                    &record.subject,
                    &record.details,
                ),
            );
            rows.push([
                Value::from(head.chain_id),
                Value::from(seq),
                Value::from(record.at_ms),
                Value::from(record.kind),
                Value::from(record.subject.clone()),
                Value::from(record.details.clone()),
                Value::from(head.hash.to_vec()),
                Value::from(hash.to_vec()),
            ]);
            head.seq = seq;
            head.hash = hash;
        }
        insert.rows(rows);
        writes.push(insert);
    }
    // Written as a `Statement` so that it is prepared once per connection.
    let mut update = Statement::new("UPDATE audit_chains SET head_seq = ");
    update
        .bind(head.seq)
        .sql(", head_hash = ")
        .bind(head.hash.to_vec())
        .sql(", lease_until_ms = ")
        .bind(now_ms + CHAIN_LEASE_MS)
        .sql(" WHERE id = ")
        .bind(chain.head.chain_id)
        .sql(" AND head_seq = ")
        .bind(chain.head.seq)
        .sql(" AND lease_owner = ")
        .bind(chain.owner.clone());
    writes.push_expecting(update, 1, lost_chain);
    head
}

/// Gives the chain up (its lease ends now), so the next writer may resume it.
pub(crate) fn release(connection: &mut AnyConnection, chain: &Chain) -> Result<(), StorageError> {
    diesel::update(
        audit_chains::table
            .find(chain.head.chain_id)
            .filter(audit_chains::lease_owner.eq(&chain.owner)),
    )
    .set((
        audit_chains::lease_owner.eq(None::<String>),
        audit_chains::lease_until_ms.eq(0_i64),
    ))
    .execute(connection)?;
    Ok(())
}

/// The text of a checkpoint's heads: one line `<chain_id> <seq> <hash as 64 hex digits>` per
/// chain, by chain.
pub fn heads_text(heads: &[ChainHead]) -> String {
    let mut heads: Vec<&ChainHead> = heads.iter().collect();
    heads.sort_by_key(|head| head.chain_id);
    heads
        .iter()
        .map(|head| {
            format!(
                "{} {} {}\n",
                head.chain_id,
                head.seq,
                hex::encode_upper(head.hash)
            )
        })
        .collect()
}

/// Parses [`heads_text`]; `None` if it is not that format.
fn parse_heads(text: &str) -> Option<Vec<ChainHead>> {
    text.lines()
        .map(|line| {
            let mut fields = line.split(' ');
            let chain_id = fields.next()?.parse().ok()?;
            let seq = fields.next()?.parse().ok()?;
            let mut hash = [0_u8; 32];
            hex::decode_to_slice(fields.next()?, &mut hash).ok()?;
            fields.next().is_none().then_some(ChainHead {
                chain_id,
                seq,
                hash,
            })
        })
        .collect()
}

/// The bytes a checkpoint's signature covers (ECDSA P-256 over their SHA-256):
/// `"nfcpay audit checkpoint v1\nat_ms <at_ms>\n"` followed by the heads text.
pub fn checkpoint_message(at_ms: i64, heads_text: &str) -> Vec<u8> {
    format!("nfcpay audit checkpoint v1\nat_ms {at_ms}\n{heads_text}").into_bytes()
}

/// Checks a checkpoint's signature over [`checkpoint_message`].
pub type SignatureCheck<'a> = &'a (dyn Fn(&[u8], &[u8; 64]) -> bool + Sync);

/// Every chain's head now.
pub(crate) fn heads(connection: &mut AnyConnection) -> Result<Vec<ChainHead>, StorageError> {
    let rows: Vec<(i64, i64, Vec<u8>)> = audit_chains::table
        .order(audit_chains::id.asc())
        .select((
            audit_chains::id,
            audit_chains::head_seq,
            audit_chains::head_hash,
        ))
        .load(connection)?;
    rows.into_iter()
        .map(|(chain_id, seq, hash)| {
            Ok(ChainHead {
                chain_id,
                seq,
                hash: hash32("audit chain head hash", hash)?,
            })
        })
        .collect()
}

/// Stores a signed checkpoint of `heads`.
pub(crate) fn insert_checkpoint(
    connection: &mut AnyConnection,
    at_ms: i64,
    heads: &[ChainHead],
    key_label: &str,
    signature: &[u8; 64],
) -> Result<(), StorageError> {
    diesel::insert_into(audit_checkpoints::table)
        .values((
            audit_checkpoints::at_ms.eq(at_ms),
            audit_checkpoints::heads.eq(heads_text(heads)),
            audit_checkpoints::key_label.eq(key_label),
            audit_checkpoints::signature.eq(signature.as_slice()),
        ))
        .execute(connection)?;
    Ok(())
}

/// Checks every checkpoint: its signature (when `signature` is given) and that each head it
/// names is still on its chain. Adds to `report`; sets its first break.
fn verify_checkpoints(
    connection: &mut AnyConnection,
    report: &mut AuditReport,
    signature: Option<SignatureCheck<'_>>,
) -> Result<(), StorageError> {
    let checkpoints: Vec<(i64, i64, String, Vec<u8>)> = audit_checkpoints::table
        .order(audit_checkpoints::id.asc())
        .select((
            audit_checkpoints::id,
            audit_checkpoints::at_ms,
            audit_checkpoints::heads,
            audit_checkpoints::signature,
        ))
        .load(connection)?;
    for (id, at_ms, heads, stored_signature) in checkpoints {
        let broken = |reason| AuditBreak {
            chain_id: 0,
            seq: id,
            reason,
        };
        if let Some(check) = signature {
            let signed = <[u8; 64]>::try_from(stored_signature.as_slice())
                .is_ok_and(|bytes| check(&checkpoint_message(at_ms, &heads), &bytes));
            if !signed {
                report.first_break = Some(broken("a checkpoint's signature does not verify"));
                return Ok(());
            }
        }
        let Some(heads) = parse_heads(&heads) else {
            report.first_break = Some(broken("a checkpoint's heads do not parse"));
            return Ok(());
        };
        for head in heads {
            let on_chain = if head.seq == 0 {
                head.hash == genesis_hash(head.chain_id)
            } else {
                audit_log::table
                    .find((head.chain_id, head.seq))
                    .select(audit_log::hash)
                    .first::<Vec<u8>>(connection)
                    .optional()?
                    .is_some_and(|hash| hash.as_slice() == head.hash.as_slice())
            };
            if !on_chain {
                report.first_break = Some(AuditBreak {
                    chain_id: head.chain_id,
                    seq: head.seq,
                    reason: "a signed checkpoint's head is not on its chain (chain rewritten or cut)",
                });
                return Ok(());
            }
        }
        report.checkpoints += 1;
    }
    Ok(())
}

type AuditRow = (i64, i64, String, String, String, Vec<u8>, Vec<u8>);

/// Walks every chain and every checkpoint, and reports the first broken link. Checkpoint
/// signatures are checked with `signature` when given.
pub(crate) fn verify(
    connection: &mut AnyConnection,
    signature: Option<SignatureCheck<'_>>,
) -> Result<AuditReport, StorageError> {
    let heads: Vec<(i64, i64, Vec<u8>)> = audit_chains::table
        .order(audit_chains::id.asc())
        .select((
            audit_chains::id,
            audit_chains::head_seq,
            audit_chains::head_hash,
        ))
        .load(connection)?;
    let mut report = AuditReport {
        records: 0,
        chains: Vec::with_capacity(heads.len()),
        checkpoints: 0,
        first_break: None,
    };
    for (chain_id, head_seq, head_hash) in heads {
        let head_hash = hash32("audit chain head hash", head_hash)?;
        match verify_chain(connection, chain_id, &mut report.records)? {
            Ok(last) if last.seq == head_seq && last.hash == head_hash => {
                report.chains.push(last);
            }
            Ok(last) => {
                report.first_break = Some(AuditBreak {
                    chain_id,
                    seq: head_seq.max(last.seq + 1),
                    reason: "the head does not match the last record (records removed)",
                });
                return Ok(report);
            }
            Err(broken) => {
                report.first_break = Some(broken);
                return Ok(report);
            }
        }
    }
    // A record outside every chain: its chain's row was deleted.
    let orphans: i64 = audit_log::table
        .filter(diesel::dsl::not(diesel::dsl::exists(
            audit_chains::table.filter(audit_chains::id.eq(audit_log::chain_id)),
        )))
        .count()
        .get_result(connection)?;
    if orphans > 0 {
        report.first_break = Some(AuditBreak {
            chain_id: 0,
            seq: 0,
            reason: "records of a chain that is not in audit_chains",
        });
        return Ok(report);
    }
    verify_checkpoints(connection, &mut report, signature)?;
    Ok(report)
}

/// Walks one chain; returns its last record's `(seq, hash)` or the first broken link.
fn verify_chain(
    connection: &mut AnyConnection,
    chain_id: i64,
    records: &mut u64,
) -> Result<Result<ChainHead, AuditBreak>, StorageError> {
    let mut expected_seq = 1_i64;
    let mut prev_hash = genesis_hash(chain_id);
    let broken = |seq, reason| {
        Ok(Err(AuditBreak {
            chain_id,
            seq,
            reason,
        }))
    };
    loop {
        let page: Vec<AuditRow> = audit_log::table
            .filter(audit_log::chain_id.eq(chain_id))
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
                return broken(expected_seq, "record missing");
            }
            if stored_prev.as_slice() != prev_hash.as_slice() {
                return broken(seq, "prev_hash is not the previous record's hash");
            }
            let hash = chain_hash(
                &prev_hash,
                &record_bytes(seq, at_ms, &kind, &subject, &details),
            );
            if stored_hash.as_slice() != hash.as_slice() {
                return broken(seq, "hash does not match the record");
            }
            prev_hash = hash;
            *records += 1;
            expected_seq += 1;
        }
    }
    Ok(Ok(ChainHead {
        chain_id,
        seq: expected_seq - 1,
        hash: prev_hash,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_text_round_trips_and_sorts_by_chain() {
        let heads = [
            ChainHead {
                chain_id: 2,
                seq: 5,
                hash: [0xAB; 32],
            },
            ChainHead {
                chain_id: 1,
                seq: 0,
                hash: GENESIS_HASH,
            },
        ];
        let text = heads_text(&heads);
        assert!(text.starts_with("1 0 0000"), "{text}");
        assert_eq!(
            parse_heads(&text).unwrap(),
            [heads[1].clone(), heads[0].clone()]
        );
        for bad in ["1 2", "x 1 00", "1 1 ZZ", "1 1 00 extra"] {
            assert!(parse_heads(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn each_chain_has_its_own_genesis() {
        assert_eq!(genesis_hash(1), GENESIS_HASH);
        assert_ne!(genesis_hash(2), genesis_hash(3));
        assert_ne!(genesis_hash(2), GENESIS_HASH);
    }

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

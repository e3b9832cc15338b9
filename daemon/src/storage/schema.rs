//! The ledger's tables as diesel sees them; the SQL is in `daemon/migrations/{sqlite,postgres}`.
#![allow(missing_docs)]

diesel::table! {
    accounts (id) {
        id -> Text,
        currency -> Text,
        balance_minor -> BigInt,
        limit_minor -> Nullable<BigInt>,
        created_at_ms -> BigInt,
    }
}

diesel::table! {
    transfers (id) {
        id -> BigInt,
        kind -> Text,
        txn_id -> Nullable<Binary>,
        amount_minor -> BigInt,
        currency -> Text,
        created_at_ms -> BigInt,
    }
}

diesel::table! {
    postings (id) {
        id -> BigInt,
        transfer_id -> BigInt,
        account_id -> Text,
        amount_minor -> BigInt,
        balance_after_minor -> BigInt,
        created_at_ms -> BigInt,
    }
}

diesel::table! {
    terminals (id) {
        id -> Text,
        account_id -> Text,
        initial_key_id -> Text,
        state -> Text,
        enrollment_code_sha256 -> Nullable<Binary>,
        code_expires_at_ms -> BigInt,
        enrolled_at_ms -> Nullable<BigInt>,
        certificate_serial -> Nullable<Text>,
        highest_counter -> BigInt,
        created_at_ms -> BigInt,
    }
}

diesel::table! {
    used_counters (terminal_id, counter) {
        terminal_id -> Text,
        counter -> BigInt,
        txn_id -> Binary,
        half -> Text,
        envelope_sha256 -> Binary,
        used_at_ms -> BigInt,
    }
}

diesel::table! {
    transactions (txn_id) {
        txn_id -> Binary,
        status -> Text,
        expires_at_ms -> BigInt,
        created_at_ms -> BigInt,
        a_terminal_id -> Nullable<Text>,
        a_account_id -> Nullable<Text>,
        a_ksn -> Nullable<Binary>,
        a_envelope_sha256 -> Nullable<Binary>,
        a_request_digest -> Nullable<Binary>,
        a_amount_minor -> Nullable<BigInt>,
        a_currency -> Nullable<Text>,
        a_received_at_ms -> Nullable<BigInt>,
        b_terminal_id -> Nullable<Text>,
        b_account_id -> Nullable<Text>,
        b_ksn -> Nullable<Binary>,
        b_envelope_sha256 -> Nullable<Binary>,
        b_request_digest -> Nullable<Binary>,
        b_payee_terminal_id -> Nullable<Text>,
        b_amount_minor -> Nullable<BigInt>,
        b_currency -> Nullable<Text>,
        b_received_at_ms -> Nullable<BigInt>,
        settlement_id -> Nullable<BigInt>,
        settled_at_ms -> Nullable<BigInt>,
        expired_at_ms -> Nullable<BigInt>,
    }
}

diesel::table! {
    audit_log (chain_id, seq) {
        chain_id -> BigInt,
        seq -> BigInt,
        at_ms -> BigInt,
        kind -> Text,
        subject -> Text,
        details -> Text,
        prev_hash -> Binary,
        hash -> Binary,
    }
}

diesel::table! {
    audit_chains (id) {
        id -> BigInt,
        head_seq -> BigInt,
        head_hash -> Binary,
        lease_owner -> Nullable<Text>,
        lease_until_ms -> BigInt,
        created_at_ms -> BigInt,
    }
}

diesel::table! {
    audit_checkpoints (id) {
        id -> BigInt,
        at_ms -> BigInt,
        heads -> Text,
        key_label -> Text,
        signature -> Binary,
    }
}

diesel::allow_tables_to_appear_in_same_query!(
    accounts,
    transfers,
    postings,
    terminals,
    used_counters,
    transactions,
    audit_log,
    audit_chains,
    audit_checkpoints,
);

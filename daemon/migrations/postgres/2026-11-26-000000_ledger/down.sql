DROP FUNCTION IF EXISTS audit_log_refuse_change() CASCADE;
DROP TABLE audit_head;
DROP TABLE audit_log;
DROP TABLE transactions;
DROP TABLE used_counters;
DROP TABLE terminals;
DROP TABLE postings;
DROP TABLE transfers;
DROP TABLE accounts;

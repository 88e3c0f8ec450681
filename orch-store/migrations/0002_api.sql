-- orch ledger schema, version 2: the control plane's tables.

-- Jobs belong to runs (backfills, schedule firings); `run_id` mirrors the job doc's spec.run.
ALTER TABLE jobs ADD COLUMN run_id INTEGER;
CREATE INDEX jobs_run ON jobs (tenant, run_id, id) WHERE run_id IS NOT NULL;

-- Bearer tokens: only the SHA-256 of the secret is kept.
CREATE TABLE api_tokens (
    id          TEXT PRIMARY KEY,
    tenant      TEXT NOT NULL,           -- a tenant, or '*' for site administrators
    scopes      TEXT NOT NULL,           -- space-separated
    label       TEXT NOT NULL DEFAULT '',
    hash        TEXT NOT NULL UNIQUE,
    created_at  INTEGER NOT NULL,
    expires_at  INTEGER,
    revoked_at  INTEGER
) WITHOUT ROWID;

-- Responses to requests sent with an Idempotency-Key, per tenant. `status` is NULL while the
-- first request is in flight. A transport cache, not part of the ledger of record.
CREATE TABLE idempotency (
    tenant      TEXT NOT NULL,
    key         TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    status      INTEGER,
    response    BLOB,
    created_at  INTEGER NOT NULL,
    PRIMARY KEY (tenant, key)
) WITHOUT ROWID;
CREATE INDEX idempotency_age ON idempotency (created_at);

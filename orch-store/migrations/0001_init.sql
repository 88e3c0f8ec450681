-- orch ledger schema, version 1.
-- The history is the ledger of record; `jobs` is its projection (each row is what
-- orch_core::apply made of the job's events) with columns extracted for indexing.

-- Site-wide facts: `site_id` names this ledger in exported bundles.
CREATE TABLE meta (
    key         TEXT PRIMARY KEY,
    value       TEXT NOT NULL
) WITHOUT ROWID;

CREATE TABLE tenants (
    id          TEXT PRIMARY KEY,
    head_seq    INTEGER NOT NULL DEFAULT 0,   -- seq of the tenant's last event
    head_hash   TEXT NOT NULL                 -- its hash: the next event's prev_hash
) WITHOUT ROWID;

CREATE TABLE projects (
    tenant      TEXT NOT NULL,
    id          TEXT NOT NULL,
    PRIMARY KEY (tenant, id)
) WITHOUT ROWID;

CREATE TABLE sources (
    tenant      TEXT NOT NULL,
    id          TEXT NOT NULL,
    host        TEXT NOT NULL,
    config      TEXT NOT NULL DEFAULT '{}',
    PRIMARY KEY (tenant, id)
) WITHOUT ROWID;

CREATE TABLE runs (
    id          INTEGER PRIMARY KEY,
    tenant      TEXT NOT NULL,
    project     TEXT NOT NULL,
    state       TEXT NOT NULL,
    doc         TEXT NOT NULL
);

CREATE TABLE jobs (
    id               INTEGER PRIMARY KEY,
    tenant           TEXT NOT NULL,
    project          TEXT NOT NULL,
    queue            TEXT NOT NULL,
    source           TEXT,
    state            TEXT NOT NULL,
    priority         INTEGER NOT NULL,
    run_after        INTEGER NOT NULL,      -- ms since epoch
    lease_id         TEXT,
    lease_expires_at INTEGER,               -- ms since epoch, while running
    idempotency_key  TEXT,
    correlation_id   TEXT NOT NULL,
    updated_at       INTEGER NOT NULL,
    doc              TEXT NOT NULL          -- canonical JSON of orch_core::Job
);
CREATE UNIQUE INDEX jobs_idempotency ON jobs (tenant, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX jobs_ready ON jobs (queue, priority DESC, run_after, id) WHERE state = 'queued';
CREATE INDEX jobs_ready_tenant ON jobs (tenant, queue, priority DESC, run_after, id) WHERE state = 'queued';
CREATE INDEX jobs_leases ON jobs (lease_expires_at) WHERE state = 'running';
CREATE INDEX jobs_tenant ON jobs (tenant, id);
CREATE INDEX jobs_correlation ON jobs (tenant, correlation_id);

-- Artifact content, addressed by its SHA-256; job_artifacts says which job produced what.
CREATE TABLE artifacts (
    sha256      TEXT PRIMARY KEY,
    size        INTEGER NOT NULL,
    content     BLOB NOT NULL
) WITHOUT ROWID;

CREATE TABLE job_artifacts (
    job_id      INTEGER NOT NULL REFERENCES jobs (id),
    name        TEXT NOT NULL,
    media_type  TEXT NOT NULL,
    size        INTEGER NOT NULL,
    sha256      TEXT NOT NULL REFERENCES artifacts (sha256),
    PRIMARY KEY (job_id, name)
) WITHOUT ROWID;

CREATE TABLE dag_edges (
    parent      INTEGER NOT NULL REFERENCES jobs (id),
    child       INTEGER NOT NULL REFERENCES jobs (id),
    PRIMARY KEY (parent, child)
) WITHOUT ROWID;
CREATE INDEX dag_edges_child ON dag_edges (child);

CREATE TABLE quotas (
    tenant      TEXT NOT NULL,
    queue       TEXT NOT NULL DEFAULT '*',
    doc         TEXT NOT NULL,
    PRIMARY KEY (tenant, queue)
) WITHOUT ROWID;

CREATE TABLE schedules (
    id          INTEGER PRIMARY KEY,
    tenant      TEXT NOT NULL,
    doc         TEXT NOT NULL
);

CREATE TABLE incidents (
    id          INTEGER PRIMARY KEY,
    tenant      TEXT NOT NULL,
    kind        TEXT NOT NULL,
    opened_at   INTEGER NOT NULL,
    closed_at   INTEGER,
    doc         TEXT NOT NULL
);

-- The ledger of record: one row per event, `line` is its canonical JSON (a line of history.jsonl).
CREATE TABLE history (
    seq            INTEGER PRIMARY KEY,
    tenant         TEXT NOT NULL,
    job_id         INTEGER,
    type           TEXT NOT NULL,
    at             INTEGER NOT NULL,
    correlation_id TEXT NOT NULL,
    hash           TEXT NOT NULL,
    line           TEXT NOT NULL
);
CREATE INDEX history_tenant ON history (tenant, seq);
CREATE INDEX history_job ON history (job_id, seq) WHERE job_id IS NOT NULL;

-- Rate-limit decisions and bucket changes: a line of throttles.jsonl each.
CREATE TABLE throttles (
    seq         INTEGER PRIMARY KEY,
    tenant      TEXT NOT NULL,
    host        TEXT,
    at          INTEGER NOT NULL,
    line        TEXT NOT NULL
);
CREATE INDEX throttles_tenant ON throttles (tenant, seq);

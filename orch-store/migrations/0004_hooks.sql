-- orch ledger schema, version 4: outbound hooks. The history is the outbox: each subscriber
-- keeps a cursor into it, moved forward only once an event is delivered (or dead-lettered), in
-- its own transaction; nothing is ever sent for a change that rolled back.

CREATE TABLE webhooks (
    id          INTEGER PRIMARY KEY,
    tenant      TEXT NOT NULL,
    url         TEXT NOT NULL,
    secret      TEXT NOT NULL,
    filter      TEXT NOT NULL DEFAULT '{}',  -- {"types": [...], "project": ..., "job_type": ...}
    cursor      INTEGER NOT NULL,            -- last history seq resolved (delivered, dead or filtered out)
    next_at     INTEGER NOT NULL DEFAULT 0,  -- no attempt before (ms), after a failure
    created_at  INTEGER NOT NULL
);
CREATE INDEX webhooks_tenant ON webhooks (tenant, id);

-- Attempts per event: pending (retrying), delivered or dead.
CREATE TABLE webhook_deliveries (
    webhook_id  INTEGER NOT NULL REFERENCES webhooks (id) ON DELETE CASCADE,
    seq         INTEGER NOT NULL,
    status      TEXT NOT NULL,
    attempts    INTEGER NOT NULL,
    last_code   INTEGER,
    last_error  TEXT,
    updated_at  INTEGER NOT NULL,
    PRIMARY KEY (webhook_id, seq)
) WITHOUT ROWID;

-- Other publishers' cursors into the history (e.g. NATS).
CREATE TABLE publishers (
    name        TEXT PRIMARY KEY,
    cursor      INTEGER NOT NULL
) WITHOUT ROWID;

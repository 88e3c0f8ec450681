-- orch ledger schema, version 5: flow control. Rate limits, concurrency limits, pauses,
-- blackouts and schedules are tenant settings like sources and quotas: each change is an
-- audit event in the tenant's history, and this table holds the current value.

CREATE TABLE flow_settings (
    tenant      TEXT NOT NULL,
    kind        TEXT NOT NULL,   -- rate_limit, concurrency, pause, blackout, schedule
    id          TEXT NOT NULL,
    doc         TEXT NOT NULL,
    PRIMARY KEY (tenant, kind, id)
) WITHOUT ROWID;

-- What each schedule last fired (its cursor), kept apart from its definition so that firing
-- never rewrites the audited setting.
CREATE TABLE schedule_state (
    tenant      TEXT NOT NULL,
    id          TEXT NOT NULL,
    last_fired  INTEGER NOT NULL,   -- ms since epoch
    last_job    INTEGER,            -- the job that firing made (or kept)
    PRIMARY KEY (tenant, id)
) WITHOUT ROWID;

CREATE INDEX jobs_running ON jobs (tenant, queue, source) WHERE state = 'running';

-- Incidents (jobs stuck, breakers open, sustained throttling): one open incident per
-- (tenant, kind, key) at a time; opening and closing each file an audit event.
ALTER TABLE incidents ADD COLUMN key TEXT NOT NULL DEFAULT '';
CREATE UNIQUE INDEX incidents_open ON incidents (tenant, kind, key) WHERE closed_at IS NULL;

-- Jobs whose lease lapsed last time and that are not finished: what the stuck-job check reads.
CREATE INDEX jobs_lease_lost ON jobs (tenant, id)
    WHERE state IN ('queued', 'running') AND json_extract(doc, '$.last_error.class') = 'lease_expired';

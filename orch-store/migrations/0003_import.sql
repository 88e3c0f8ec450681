-- orch ledger schema, version 3: history imported from other sites' bundles (Offline Kit).
-- Imported events keep their origin site's sequence numbers and hash chains; they never mix
-- with this site's own history, and `imported_jobs` is what replaying them gives.

-- Per origin site and bundle scope ('*' or a tenant): how far imports got. Only moves forward.
CREATE TABLE import_sites (
    site_id          TEXT NOT NULL,
    scope            TEXT NOT NULL,
    to_seq           INTEGER NOT NULL,
    manifest_sha256  TEXT NOT NULL,      -- of the last bundle imported
    anchor_at        INTEGER NOT NULL,   -- highest time anchor seen (ms); never decreases
    root_version     INTEGER NOT NULL,   -- trust root version that verified it; never decreases
    bundles          INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL,
    PRIMARY KEY (site_id, scope)
) WITHOUT ROWID;

-- Every bundle applied, by the digest of its manifest.
CREATE TABLE import_bundles (
    manifest_sha256  TEXT PRIMARY KEY,
    site_id          TEXT NOT NULL,
    scope            TEXT NOT NULL,
    from_seq         INTEGER NOT NULL,
    to_seq           INTEGER NOT NULL,
    events           INTEGER NOT NULL,
    imported_at      INTEGER NOT NULL,
    actor            TEXT NOT NULL
) WITHOUT ROWID;

CREATE TABLE imported_history (
    site_id     TEXT NOT NULL,
    seq         INTEGER NOT NULL,
    tenant      TEXT NOT NULL,
    job_id      INTEGER,
    hash        TEXT NOT NULL,
    line        TEXT NOT NULL,
    PRIMARY KEY (site_id, seq)
) WITHOUT ROWID;
CREATE INDEX imported_history_tenant ON imported_history (site_id, tenant, seq);

CREATE TABLE imported_jobs (
    site_id     TEXT NOT NULL,
    id          INTEGER NOT NULL,
    tenant      TEXT NOT NULL,
    doc         TEXT NOT NULL,
    PRIMARY KEY (site_id, id)
) WITHOUT ROWID;

-- Throttle records carried by imported bundles (each bundle holds its scope's full set).
CREATE TABLE imported_throttles (
    site_id     TEXT NOT NULL,
    seq         INTEGER NOT NULL,
    tenant      TEXT NOT NULL,
    line        TEXT NOT NULL,
    PRIMARY KEY (site_id, seq)
) WITHOUT ROWID;

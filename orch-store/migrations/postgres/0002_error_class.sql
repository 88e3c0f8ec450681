-- The class of a job's last error as a column of its own: the stuck-job index (unfinished
-- jobs whose lease lapsed last time) reads it, instead of parsing the document of every job
-- written to evaluate its condition.
ALTER TABLE jobs ADD COLUMN last_error_class TEXT;
UPDATE jobs SET last_error_class = doc::jsonb #>> '{last_error,class}';
DROP INDEX jobs_lease_lost;
CREATE INDEX jobs_lease_lost ON jobs (tenant, id)
    WHERE state IN ('queued', 'running') AND last_error_class = 'lease_expired';

-- The whole schema of the generations service. The service applies this file at startup when
-- the database's schema_version is not this file's hash: under an advisory lock, so replicas
-- starting together take turns, and a lock timeout, so that it never makes requests queue
-- behind it. Every statement is idempotent; what is dropped is only what an earlier version
-- made and this one replaced. Needs PostgreSQL 14 or newer.

CREATE TABLE IF NOT EXISTS jobs (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    status text NOT NULL DEFAULT 'pending'
        CHECK (status IN ('pending', 'processing', 'completed', 'failed', 'cancelled')),
    num_images integer NOT NULL CHECK (num_images > 0),
    animal text,
    image_urls jsonb,
    error text,
    -- How many times a worker has claimed the job. It is also the fencing token: every
    -- write a worker makes after its claim requires attempts to still equal what it claimed.
    attempts integer NOT NULL DEFAULT 0,
    -- When the job may next be claimed: for a pending job, once its retry backoff is over;
    -- for a processing job, when its worker's lease runs out (the worker is presumed dead).
    available_at timestamptz NOT NULL DEFAULT now(),
    idempotency_key text,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    completed_at timestamptz
);

-- A batch's Idempotency-Key, and each job's position in its batch (NULL for a single POST).
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS batch_key text;
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS batch_index integer;

-- The claim query walks this index in order and stops after as many rows as it needs:
-- it only holds jobs that a worker may run now or later, so it stays small.
CREATE INDEX IF NOT EXISTS jobs_claimable ON jobs (available_at)
    WHERE status IN ('pending', 'processing');

-- Newest-first listing and its keyset cursor, with and without a status filter. Retention
-- finds expired jobs through the second one too.
CREATE INDEX IF NOT EXISTS jobs_newest ON jobs (created_at, id);
CREATE INDEX IF NOT EXISTS jobs_status_newest ON jobs (status, created_at, id);

-- Two requests with the same Idempotency-Key can race; these indexes let exactly one insert
-- win: one for single POSTs, one for batches, whose jobs share their key.
CREATE UNIQUE INDEX IF NOT EXISTS jobs_idempotency_key ON jobs (idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE UNIQUE INDEX IF NOT EXISTS jobs_batch_key ON jobs (batch_key, batch_index)
    WHERE batch_key IS NOT NULL;

-- 1.0 announced jobs from per-row triggers, whose NOTIFY made inserts commit one at a time;
-- the service now announces them itself, once per batch, after they commit.
DROP TRIGGER IF EXISTS jobs_notify_new ON jobs;
DROP TRIGGER IF EXISTS jobs_notify_done ON jobs;
DROP FUNCTION IF EXISTS notify_generations_new();
DROP FUNCTION IF EXISTS notify_generations_done();

-- The hash of the schema.sql applied last (one row), so that a start with the schema
-- current reads one row and takes no lock on jobs.
CREATE TABLE IF NOT EXISTS schema_version (version text NOT NULL);

-- Pictures a provider sent as bytes (base64), served at /generations/{id}/images/{n} (n from 1).
-- Retention deletes them with their job, in the same statement; no foreign key, whose cascade
-- would run one statement per deleted job.
CREATE TABLE IF NOT EXISTS images (
    job_id uuid NOT NULL,
    position integer NOT NULL,
    content_type text NOT NULL,
    data bytea NOT NULL,
    PRIMARY KEY (job_id, position)
);

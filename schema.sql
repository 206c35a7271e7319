-- The whole schema of the generations service. Applied at every startup, under an advisory
-- lock so replicas starting together take turns: every statement is idempotent and nothing
-- is ever dropped. Needs PostgreSQL 14 or newer (CREATE OR REPLACE TRIGGER).

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

-- The claim query walks this index in order and stops after as many rows as it needs:
-- it only holds jobs that a worker may run now or later, so it stays small.
CREATE INDEX IF NOT EXISTS jobs_claimable ON jobs (available_at)
    WHERE status IN ('pending', 'processing');

-- Newest-first listing and its keyset cursor, with and without a status filter.
CREATE INDEX IF NOT EXISTS jobs_newest ON jobs (created_at, id);
CREATE INDEX IF NOT EXISTS jobs_status_newest ON jobs (status, created_at, id);

-- Two POSTs with the same Idempotency-Key can race; this index lets exactly one insert win.
CREATE UNIQUE INDEX IF NOT EXISTS jobs_idempotency_key ON jobs (idempotency_key)
    WHERE idempotency_key IS NOT NULL;

-- Workers LISTEN on generations_new: a job became runnable now (created, or handed back;
-- a retry waiting out its backoff is found by polling instead).
CREATE OR REPLACE FUNCTION notify_generations_new() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('generations_new', '');
    RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER jobs_notify_new
    AFTER INSERT OR UPDATE OF status ON jobs
    FOR EACH ROW WHEN (NEW.status = 'pending' AND NEW.available_at <= now())
    EXECUTE FUNCTION notify_generations_new();

-- Long polls LISTEN on generations_done: the payload is the id of a job that just ended.
CREATE OR REPLACE FUNCTION notify_generations_done() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('generations_done', NEW.id::text);
    RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER jobs_notify_done
    AFTER UPDATE OF status ON jobs
    FOR EACH ROW WHEN (NEW.status IN ('completed', 'failed', 'cancelled')
                       AND OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION notify_generations_done();

-- The behaviour settings of the daemon, as its last pass used them (issue 11 point 3). `plan`, `status`
-- and the other read-only commands read them, so that what they show is what the daemon decides, not
-- what the caller's own environment would decide.
--
-- One row, the latest: the read-only commands need one answer ("the daemon's settings"), replicas are
-- meant to share one configuration, and a row per instance would grow with every restart (an instance
-- is a process) and need pruning. A replica whose settings differ takes the row over at its next pass,
-- which the row's `instance` and `recorded_at` then say.

create table reconciler_settings (
    id boolean primary key default true check (id),
    -- RECONCILER_ variable -> its value as written in the environment (`10s`, `3`, `A,B`).
    settings jsonb not null check (jsonb_typeof(settings) = 'object'),
    -- Which process recorded them: host name and process id.
    instance text not null,
    -- Since when this instance has used these settings (unchanged while both stay the same).
    recorded_at timestamptz not null,
    -- The latest pass that used them.
    last_pass_at timestamptz not null,
    check (last_pass_at >= recorded_at)
);

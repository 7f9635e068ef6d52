-- The platform's claim events behind the claim/miss counters (reconciler/claim_event_counters.py), read
-- beside the passes, with the lifetime counters' refresh. Only the two types the counters know are read.

-- name: claim_events_by_preset
-- Every preset's events, counted once at start-up (the table holds at most the retention's worth).
select
    e.preset_id,
    count(*) filter (where e.event_type = 'claim_succeeded') as claim_succeeded,
    count(*) filter (where e.event_type = 'claim_missed') as claim_missed
from prebuild_events e
where e.event_type in ('claim_succeeded', 'claim_missed')
group by e.preset_id

-- name: claim_events_since
-- The events created since $1 (the last refresh's time less the overlap window), through the index on
-- created_at that the purge uses: as many rows as the window holds, whatever the table's age. No upper
-- bound: an event from a clock ahead of the database's is counted now, and remembered until it leaves the
-- window.
select e.id, e.preset_id, e.event_type, e.created_at
from prebuild_events e
where e.created_at >= $1 and e.event_type in ('claim_succeeded', 'claim_missed')

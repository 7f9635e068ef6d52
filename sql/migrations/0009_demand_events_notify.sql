-- Claim events wake the daemon (issues 14 and 16.1): a `claim_missed` says a user found the pool empty,
-- which a preset's expression may answer with a higher target at once rather than at the next periodic
-- pass. A claim that succeeded already notifies through its workspace's new owner (migration 0007); the
-- same payload in one transaction is delivered once. Only presets with a target expression: for the
-- others an event changes nothing the daemon decides, and their claim path pays one statement-level
-- call that finds nothing. Statement-level with a transition table, two primary-key lookups per preset.
create function reconciler_demand_events() returns trigger
language plpgsql as $$
begin
    perform reconciler_notify_templates('claim', array(
        select distinct tv.template_id
        -- The presets first: a bulk insert of many events per preset looks each preset up once.
        from (
            select distinct n.preset_id from new_rows n where n.event_type in ('claim_succeeded', 'claim_missed')
        ) events
        join template_version_presets p on p.id = events.preset_id
        join template_versions tv on tv.id = p.template_version_id
        where p.desired_instances is not null and p.desired_instances_expression ~ '[^[:space:]]'
            and tv.template_id is not null
    ));
    return null;
end
$$;
create trigger reconciler_demand_events
    after insert on prebuild_events
    referencing new table as new_rows
    for each statement execute function reconciler_demand_events();

-- Change events (issue 16.1): the platform's writes that matter to reconciliation wake the daemon through
-- NOTIFY on the channel `reconciler_events`, so that it reacts in about a second instead of at its next
-- periodic pass. The periodic pass stays the resync: a notification lost (the daemon was not listening)
-- is caught by it, so these triggers need only be fast and mostly right.
--
-- Cost to the platform's own writes comes first (bench/triggers.py measures it): every trigger is
-- statement-level with transition tables, so a statement pays one function call and one notification
-- whatever the number of rows, and the only lookups are by primary key, on the rows the statement
-- changed. A payload names templates, not presets: every table here reaches a workspace's template in at
-- most one primary-key join, whereas a workspace's preset lies in its build history. The daemon's
-- targeted pass reads every preset of those templates (a handful).
--
-- Payload: `KIND:ID,ID,...` (template ids), or `KIND:*` when the statement touched more templates than
-- fit comfortably in a notification (8000 bytes at most; the daemon then runs a full pass), or after a
-- change that concerns every preset (reconciliation paused or resumed). Identical payloads of one
-- transaction are delivered once (PostgreSQL folds them).

create function reconciler_notify_templates(kind text, template_ids uuid[]) returns void
language plpgsql as $$
begin
    if template_ids is null or cardinality(template_ids) = 0 then
        return;
    end if;
    -- 100 ids are ~3,700 bytes: well under the 8,000-byte limit of a payload.
    if cardinality(template_ids) > 100 then
        perform pg_notify('reconciler_events', kind || ':*');
    else
        perform pg_notify('reconciler_events', kind || ':' || array_to_string(template_ids, ','));
    end if;
end
$$;

-- A prebuild claimed (its owner is no longer the prebuilds user) or deleted.
create function reconciler_workspaces_changed() returns trigger
language plpgsql as $$
begin
    perform reconciler_notify_templates('claim', array(
        select distinct n.template_id
        from new_rows n
        join old_rows o on o.id = n.id
        where o.owner_id = 'c42fdf75-3097-471c-8c33-fb52454d81c0' and not o.deleted
            and (n.owner_id <> o.owner_id or n.deleted)
    ));
    return null;
end
$$;
create trigger reconciler_workspaces_changed
    after update on workspaces
    referencing old table as old_rows new table as new_rows
    for each statement execute function reconciler_workspaces_changed();

-- A prebuild's job finished (succeeded, failed or canceled): the pool has one more running prebuild, a
-- failure to back off from, or room for a replacement.
create function reconciler_jobs_finished() returns trigger
language plpgsql as $$
begin
    perform reconciler_notify_templates('job', array(
        select distinct w.template_id
        from new_rows n
        join old_rows o on o.id = n.id
        join workspace_builds b on b.job_id = n.id
        join workspaces w on w.id = b.workspace_id
        where n.initiator_id = 'c42fdf75-3097-471c-8c33-fb52454d81c0'
            and o.completed_at is null and n.completed_at is not null
    ));
    return null;
end
$$;
create trigger reconciler_jobs_finished
    after update on provisioner_jobs
    referencing old table as old_rows new table as new_rows
    for each statement execute function reconciler_jobs_finished();

-- A template's active version changed (a new version to roll out), or it was deleted or deprecated.
create function reconciler_templates_changed() returns trigger
language plpgsql as $$
begin
    perform reconciler_notify_templates('template', array(
        select n.id
        from new_rows n
        join old_rows o on o.id = n.id
        where n.active_version_id is distinct from o.active_version_id
            or n.deleted <> o.deleted or n.deprecated <> o.deprecated
    ));
    return null;
end
$$;
create trigger reconciler_templates_changed
    after update on templates
    referencing old table as old_rows new table as new_rows
    for each statement execute function reconciler_templates_changed();

-- A preset's target, lifetime, invalidation, time zone or reset changed, or a preset with prebuilds was
-- added. Compared as whole rows less the columns the reconciler itself writes (its status marks), so
-- that a column added later (by this project or the platform) counts without a new migration, and the
-- daemon's own writes do not wake it.
create function reconciler_presets_changed() returns trigger
language plpgsql as $$
begin
    if tg_op = 'INSERT' then
        perform reconciler_notify_templates('preset', array(
            select distinct tv.template_id
            from new_rows n
            join template_versions tv on tv.id = n.template_version_id
            where n.desired_instances is not null and tv.template_id is not null
        ));
    else
        perform reconciler_notify_templates('preset', array(
            select distinct tv.template_id
            from new_rows n
            join old_rows o on o.id = n.id
            join template_versions tv on tv.id = n.template_version_id
            where tv.template_id is not null
                and (to_jsonb(n) - 'prebuild_status' - 'prebuild_status_changed_at' - 'failure_episode')
                    is distinct from
                    (to_jsonb(o) - 'prebuild_status' - 'prebuild_status_changed_at' - 'failure_episode')
        ));
    end if;
    return null;
end
$$;
create trigger reconciler_presets_inserted
    after insert on template_version_presets
    referencing new table as new_rows
    for each statement execute function reconciler_presets_changed();
create trigger reconciler_presets_updated
    after update on template_version_presets
    referencing old table as old_rows new table as new_rows
    for each statement execute function reconciler_presets_changed();

-- A preset's schedules changed (PostgreSQL allows transition tables only on single-event triggers,
-- hence three, sharing one function over the rows each one has).
create function reconciler_schedules_changed() returns trigger
language plpgsql as $$
begin
    if tg_op = 'INSERT' then
        perform reconciler_notify_templates('schedule', array(
            select distinct tv.template_id
            from new_rows n
            join template_version_presets p on p.id = n.preset_id
            join template_versions tv on tv.id = p.template_version_id
            where tv.template_id is not null
        ));
    elsif tg_op = 'UPDATE' then
        perform reconciler_notify_templates('schedule', array(
            select distinct tv.template_id
            from (select preset_id from new_rows union select preset_id from old_rows) n
            join template_version_presets p on p.id = n.preset_id
            join template_versions tv on tv.id = p.template_version_id
            where tv.template_id is not null
        ));
    else
        perform reconciler_notify_templates('schedule', array(
            select distinct tv.template_id
            from old_rows o
            join template_version_presets p on p.id = o.preset_id
            join template_versions tv on tv.id = p.template_version_id
            where tv.template_id is not null
        ));
    end if;
    return null;
end
$$;
create trigger reconciler_schedules_inserted
    after insert on template_version_preset_prebuild_schedules
    referencing new table as new_rows
    for each statement execute function reconciler_schedules_changed();
create trigger reconciler_schedules_updated
    after update on template_version_preset_prebuild_schedules
    referencing old table as old_rows new table as new_rows
    for each statement execute function reconciler_schedules_changed();
create trigger reconciler_schedules_deleted
    after delete on template_version_preset_prebuild_schedules
    referencing old table as old_rows
    for each statement execute function reconciler_schedules_changed();

-- Reconciliation paused or resumed: concerns every preset. The table is tiny and rarely written, so a
-- row trigger limited to the one key is simplest (PostgreSQL folds the identical payloads).
create function reconciler_settings_changed() returns trigger
language plpgsql as $$
begin
    perform pg_notify('reconciler_events', 'settings:*');
    return null;
end
$$;
create trigger reconciler_settings_written
    after insert or update on site_configs
    for each row when (new.key = 'prebuilds_settings')
    execute function reconciler_settings_changed();
create trigger reconciler_settings_deleted
    after delete on site_configs
    for each row when (old.key = 'prebuilds_settings')
    execute function reconciler_settings_changed();

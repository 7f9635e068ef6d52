-- A preset's failure episode number never goes back. "One notification per preset, episode and
-- recipient" rests on it: the outbox's dedupe keys name the episode, so an episode number used again
-- would silence the next episode's notifications (its keys exist already), and a number reset to 0
-- would do so for every episode up to the old one. This is a rule of the data, whoever writes it (the
-- daemon's role, the platform, an operator at a psql prompt), so it lives in the schema rather than in
-- the role script: a CHECK cannot compare a row with its previous version, a trigger can.

create function template_version_presets_failure_episode_only_grows() returns trigger
language plpgsql
as $$
begin
    raise exception 'failure_episode of preset % cannot go from % back to %',
        old.id, old.failure_episode, new.failure_episode
        using errcode = 'check_violation',
              hint = 'an operator reset is `reconciler presets reset`, which keeps the episode number';
end
$$;

-- The WHEN clause decides without calling the function, so updates that do not lower the episode (all
-- of them, normally) cost nothing more.
create trigger failure_episode_only_grows
    before update on template_version_presets
    for each row
    when (new.failure_episode < old.failure_episode)
    execute function template_version_presets_failure_episode_only_grows();

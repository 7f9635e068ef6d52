"""The prebuilds user's memberships, added every pass before the snapshot (BEHAVIOR.md section 7).

One read tells which organizations with prebuilds miss something; when one does, one transaction adds
what is missing in all of them (a statement per table, whatever the number of organizations). Coder
fails the whole cycle when this goes wrong; here a failure is confined: when the transaction for all
organizations fails (one organization's row refused by a constraint, a trigger or a policy), the
organizations are tried again one transaction each, so that only the organization at fault is left
out. Failures are logged and returned for the pass to count; the next pass tries again. Nothing here
ever stops the pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from uuid import UUID

import asyncpg
import structlog

from reconciler import db
from reconciler.store.memberships import (
    MembershipsAdded,
    OrganizationMemberships,
    add_prebuilds_memberships,
    read_prebuilds_memberships,
)

logger = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class MembershipFailure:
    """An organization whose memberships could not be added this pass; no organization when the step
    failed as a whole (the read, or a database that went away)."""

    organization_id: UUID | None
    organization_name: str | None
    error: str


@dataclass(frozen=True, slots=True)
class MembershipsOutcome:
    missing: tuple[OrganizationMemberships, ...] = ()
    added: tuple[MembershipsAdded, ...] = ()
    failures: tuple[MembershipFailure, ...] = ()


def missing_memberships(organizations: Sequence[OrganizationMemberships]) -> tuple[OrganizationMemberships, ...]:
    """The organizations where the prebuilds user lacks something, in the order given."""
    return tuple(organization for organization in organizations if organization.missing)


def _may_be_one_organizations_rows(error: BaseException) -> bool:
    """Whether retrying organization by organization can isolate the cause.

    A refused row (a constraint, a trigger, a policy, a deadlock with another writer) concerns some
    organizations only. A connection that broke, a statement timeout or a lock that could not be taken
    concern the database: retrying once per organization would only multiply the wait.
    """
    if not isinstance(error, asyncpg.PostgresError):
        return False
    state = error.sqlstate or ""
    return not (state.startswith(("08", "57")) or state == "55P03")


async def ensure_prebuilds_memberships(
    connection: db.Connection, template_ids: Sequence[UUID] | None = None
) -> MembershipsOutcome:
    """Add what the prebuilds user is missing in every organization with prebuilds (with `template_ids`,
    a targeted pass's: in those templates' organizations); never raises for database trouble."""
    try:
        missing = missing_memberships(await read_prebuilds_memberships(connection, template_ids))
    except db.SURVIVABLE_ERRORS as error:
        return _failed(MembershipFailure(None, None, db.describe_error(error)))
    if not missing:
        return MembershipsOutcome()
    try:
        added = await add_prebuilds_memberships(connection, [each.organization_id for each in missing])
    except db.SURVIVABLE_ERRORS as error:
        if not _may_be_one_organizations_rows(error):
            return _failed(MembershipFailure(None, None, db.describe_error(error)), missing=missing)
        logger.warning(
            "memberships.batch_failed",
            organizations=len(missing),
            error=db.describe_error(error),
            consequence="retrying organization by organization",
        )
        return await _one_organization_at_a_time(connection, missing)
    _log_added(added)
    return MembershipsOutcome(missing=missing, added=tuple(added))


async def ensure_prebuilds_memberships_in(
    pool: db.Acquirer, template_ids: Sequence[UUID] | None = None
) -> MembershipsOutcome:
    """`ensure_prebuilds_memberships` on a connection of its own from `pool` (the pass's lock connection is
    in a read-only transaction); a connection that cannot be had is a failure of the step, not of the pass."""
    try:
        async with pool.acquire() as connection:
            return await ensure_prebuilds_memberships(connection, template_ids)
    except db.SURVIVABLE_ERRORS as error:
        return _failed(MembershipFailure(None, None, db.describe_error(error)))


async def _one_organization_at_a_time(
    connection: db.Connection, missing: tuple[OrganizationMemberships, ...]
) -> MembershipsOutcome:
    added: list[MembershipsAdded] = []
    failures: list[MembershipFailure] = []
    for position, organization in enumerate(missing):
        try:
            added.extend(await add_prebuilds_memberships(connection, [organization.organization_id]))
        except db.SURVIVABLE_ERRORS as error:
            failures.append(
                MembershipFailure(
                    organization.organization_id, organization.organization_name, db.describe_error(error)
                )
            )
            if not _may_be_one_organizations_rows(error):
                # The database itself is in trouble: the organizations not tried yet wait for the next pass.
                _log_added(added)
                _log_failure(failures[-1], not_tried=len(missing) - position - 1)
                return MembershipsOutcome(missing=missing, added=tuple(added), failures=tuple(failures))
            _log_failure(failures[-1])
    _log_added(added)
    return MembershipsOutcome(missing=missing, added=tuple(added), failures=tuple(failures))


def _failed(failure: MembershipFailure, *, missing: tuple[OrganizationMemberships, ...] = ()) -> MembershipsOutcome:
    _log_failure(failure)
    return MembershipsOutcome(missing=missing, failures=(failure,))


def _log_added(added: Sequence[MembershipsAdded]) -> None:
    for organization in added:
        logger.info(
            "memberships.added",
            organization_id=str(organization.organization_id),
            organization_name=organization.organization_name,
            added=[kind.value for kind in organization.added],
        )


def _log_failure(failure: MembershipFailure, *, not_tried: int = 0) -> None:
    logger.error(
        "memberships.failed",
        organization_id=str(failure.organization_id) if failure.organization_id else None,
        organization_name=failure.organization_name,
        error=failure.error,
        not_tried=not_tried,
        consequence="retried next pass; presets are reconciled as usual",
    )

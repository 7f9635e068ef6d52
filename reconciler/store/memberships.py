"""Typed access to the prebuilds user's memberships (`sql/queries/memberships.sql`)."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from uuid import UUID

from reconciler import db

# Fixed by the contract (CONTRACTS.md section 4); the statements name them literally.
PREBUILDS_GROUP_NAME = "coderprebuiltworkspaces"
PREBUILDS_GROUP_DISPLAY_NAME = "Prebuilt Workspaces"


def _query(name: str) -> str:
    return db.queries_in("memberships.sql")[name]


class MembershipKind(enum.StrEnum):
    """The three rows the prebuilds user needs in an organization, in the order they are added."""

    ORGANIZATION_MEMBER = "organization_member"
    GROUP = "group"
    GROUP_MEMBER = "group_member"


@dataclass(frozen=True, slots=True)
class OrganizationMemberships:
    """What the prebuilds user has in one organization that has prebuilds configured."""

    organization_id: UUID
    organization_name: str
    is_member: bool
    group_exists: bool
    in_group: bool

    @property
    def missing(self) -> tuple[MembershipKind, ...]:
        # Without the group there can be no group membership either: both are missing.
        found = {
            MembershipKind.ORGANIZATION_MEMBER: self.is_member,
            MembershipKind.GROUP: self.group_exists,
            MembershipKind.GROUP_MEMBER: self.in_group,
        }
        return tuple(kind for kind in MembershipKind if not found[kind])


@dataclass(frozen=True, slots=True)
class MembershipsAdded:
    """What was added in one organization."""

    organization_id: UUID
    organization_name: str
    added: tuple[MembershipKind, ...]


async def read_prebuilds_memberships(
    connection: db.Connection, template_ids: Sequence[UUID] | None = None
) -> list[OrganizationMemberships]:
    """Every organization with prebuilds configured, by name, with the prebuilds user's memberships there."""
    if template_ids is None:
        rows = await connection.fetch(_query("read_prebuilds_memberships"))
    else:
        # A targeted pass's: the organizations of those templates only.
        rows = await connection.fetch(_query("read_prebuilds_memberships_targeted"), list(template_ids))
    return [
        OrganizationMemberships(
            organization_id=row["organization_id"],
            organization_name=row["organization_name"],
            is_member=row["is_member"],
            group_exists=row["group_exists"],
            in_group=row["in_group"],
        )
        for row in rows
    ]


# The statement that adds each kind of row, in the order they must run (see sql/queries/memberships.sql).
_ADD_STATEMENTS = (
    (MembershipKind.ORGANIZATION_MEMBER, "add_prebuilds_organization_members"),
    (MembershipKind.GROUP, "add_prebuilds_groups"),
    (MembershipKind.GROUP_MEMBER, "add_prebuilds_group_members"),
)


async def add_prebuilds_memberships(
    connection: db.Connection, organization_ids: Sequence[UUID]
) -> list[MembershipsAdded]:
    """Add what is missing in these organizations: three statements (one per table, whatever the number
    of organizations) in one transaction, or in a savepoint when the caller has a transaction open.

    Organizations that no longer exist are ignored; rows that exist, or that a concurrent transaction
    inserts first, are left as they are. Returns the organizations where something was added, by name.
    """
    identifiers = list(organization_ids)
    names: dict[UUID, str] = {}
    added: dict[UUID, list[MembershipKind]] = {}
    async with connection.transaction():
        for kind, statement in _ADD_STATEMENTS:
            for row in await connection.fetch(_query(statement), identifiers):
                names[row["organization_id"]] = row["organization_name"]
                added.setdefault(row["organization_id"], []).append(kind)
    return [
        MembershipsAdded(organization_id, names[organization_id], tuple(kinds))
        for organization_id, kinds in sorted(added.items(), key=lambda item: (names[item[0]], item[0]))
    ]

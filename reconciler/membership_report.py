"""What `plan` and `status` say about the prebuilds user's memberships (BEHAVIOR.md section 7).

`plan` shows the rows the next pass would add; `status` notes each organization where the prebuilds user
is missing something, since prebuilds created there would be owned by a stranger until it is added.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from reconciler.store.memberships import OrganizationMemberships
from reconciler.terminal import printable


def memberships_json(missing: Sequence[OrganizationMemberships]) -> list[dict[str, Any]]:
    """The organizations with prebuilds where something is missing, with what the next pass would add."""
    return [
        {
            "organization_id": str(organization.organization_id),
            "organization_name": organization.organization_name,
            "to_add": [kind.value for kind in organization.missing],
        }
        for organization in missing
    ]


def memberships_lines(missing: Sequence[OrganizationMemberships], *, status: bool) -> list[str]:
    """One line per organization where the prebuilds user misses something; none when nothing does."""
    lines = []
    for organization in missing:
        kinds = ", ".join(kind.value for kind in organization.missing)
        name = printable(organization.organization_name)
        if status:
            lines.append(
                f"note: the prebuilds user is missing from organization {name} ({kinds}); the next pass adds it"
            )
        else:
            lines.append(f"memberships: would add {kinds} in organization {name}")
    return lines

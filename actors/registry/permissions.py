"""Who may do what: one table from operation to the least role allowed, and `check` that applies it.

Roles are ordered (viewer < developer < admin) and each may do what the roles below it may, so
one minimum role per operation says everything. The README shows `permissions_table()`
between markers; tests/unit/test_auth_permissions.py keeps the two equal and checks every cell.
"""

from __future__ import annotations

from app.auth.identity import ANONYMOUS, ROLES, Principal, PermissionDenied

PROTECTED_ALIASES = ("production",)
"""Aliases whose moves (set, remove, rollback) need the admin role."""

PERMISSIONS: dict[str, str] = {
    "read": "viewer",                     # list, show, compare, history, lineage
    "predict": "viewer",                  # call a served model
    "train": "developer",
    "tune": "developer",
    "compress": "developer",
    "register": "developer",              # add a version, log its metrics
    "set_alias": "developer",             # set / remove an alias other than production
    "rollback": "developer",              # roll back an alias other than production
    "set_alias_production": "admin",
    "rollback_production": "admin",
    "delete_version": "admin",
    "manage_keys": "admin",               # create, list and revoke API keys
    "audit_read": "admin",
}
"""Operation -> the least role that may perform it."""

OPERATIONS = tuple(PERMISSIONS)


def allowed(role: str, operation: str) -> bool:
    """Whether `role` may perform `operation` (KeyError for an unknown operation: a typo must not pass)."""
    return ROLES.index(role) >= ROLES.index(PERMISSIONS[operation])


def alias_operation(alias: str, *, rollback: bool = False) -> str:
    """The operation that moving `alias` is: production moves are their own, admin-only operations."""
    protected = alias in PROTECTED_ALIASES
    if rollback:
        return "rollback_production" if protected else "rollback"
    return "set_alias_production" if protected else "set_alias"


def check(principal: Principal | None, operation: str, target: str) -> None:
    """Return when `principal` may perform `operation` on `target`; PermissionDenied naming role and operation otherwise.

    No principal (an anonymous call where auth is required) may do nothing.
    """
    need = PERMISSIONS[operation]
    if principal is None:
        raise PermissionDenied(
            f"{ANONYMOUS} caller may not {operation} {target}: it needs role {need} or higher; "
            "authenticate with an API key or a token"
        )
    if not allowed(principal.role, operation):
        raise PermissionDenied(
            f"{principal.kind} {principal.name!r} has role {principal.role}, which may not {operation} {target} "
            f"(needs role {need} or higher)"
        )


def permissions_table() -> str:
    """The table as Markdown: one row per operation, one column per role (what the README shows)."""
    lines = ["| operation | " + " | ".join(ROLES) + " |", "|---|" + "---|" * len(ROLES)]
    for operation in OPERATIONS:
        cells = ["yes" if allowed(role, operation) else "-" for role in ROLES]
        lines.append(f"| `{operation}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)

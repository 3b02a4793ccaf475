"""API keys with roles. Keys are compared in constant time and never logged or echoed."""

from __future__ import annotations

import hmac
import logging

from cellinspect.serving.settings import Mode, Role, Settings

log = logging.getLogger(__name__)

# Each role may do what the roles below it may: an operator can also inspect, an admin anything.
ROLE_RANK = {Role.STATION: 1, Role.OPERATOR: 2, Role.ADMIN: 3}


class ApiKeyAuth:
    """Maps a presented key to its role; open (every caller is admin) when no keys are set in dev."""

    def __init__(self, settings: Settings) -> None:
        self._keys = [(key.encode(), role) for key, role in settings.parsed_keys().items()]
        self.open = not self._keys
        if self.open and settings.mode is Mode.DEV:
            log.warning("no API keys configured: every route is open (dev mode only)")

    def role_for(self, presented: str | None) -> Role | None:
        """The role of `presented`, or None. Compares against every key, matching or not,
        so the time taken does not reveal how much of a key was right."""
        if self.open:
            return Role.ADMIN
        if not presented:
            return None
        candidate = presented.encode()
        found: Role | None = None
        for key, role in self._keys:
            if hmac.compare_digest(key, candidate):
                found = role
        return found


def presented_key(x_api_key: str | None, authorization: str | None) -> str | None:
    """The key from `X-API-Key: KEY` or `Authorization: Bearer KEY`."""
    if x_api_key:
        return x_api_key.strip()
    if authorization:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return None


def allows(role: Role, needed: Role) -> bool:
    return ROLE_RANK[role] >= ROLE_RANK[needed]

"""Bearer tokens with roles: a tokens file of ``TOKEN ROLE`` lines; ``submit`` may do everything, ``read`` GET only."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from pathlib import Path

ROLES = ("submit", "read")
#: tokens shorter than this are refused: a guessable token is no protection
MIN_TOKEN_LEN = 8


class TokensError(ValueError):
    """A tokens file that cannot be used; the message names the line."""


class AuthError(Exception):
    """A request without a valid token (401) or without the role it needs (403)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Tokens:
    roles: dict  #: token -> role

    @classmethod
    def load(cls, path: str | Path) -> "Tokens":
        roles = {}
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise TokensError(f"cannot read tokens file {path}: {exc.strerror or exc}") from None
        for number, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split()
            if len(parts) != 2 or parts[1] not in ROLES:
                raise TokensError(f"{path}:{number}: expected 'TOKEN ROLE' with ROLE one of {', '.join(ROLES)}")
            if len(parts[0]) < MIN_TOKEN_LEN:
                raise TokensError(f"{path}:{number}: a token must have at least {MIN_TOKEN_LEN} characters")
            roles[parts[0]] = parts[1]
        if not roles:
            raise TokensError(f"{path}: no tokens in the file")
        return cls(roles)

    def role_of(self, token: str | None) -> str | None:
        if not token:
            return None
        found = None
        for known, role in self.roles.items():  # compare with every token, in constant time each
            if hmac.compare_digest(known.encode(), token.encode()):
                found = role
        return found

    def check(self, token: str | None, needs: str) -> str:
        """The role of ``token`` if it may do what needs ``needs`` (``read`` or ``submit``), else AuthError."""
        role = self.role_of(token)
        if role is None:
            raise AuthError(401, "a valid token is needed: Authorization: Bearer TOKEN" if token is None
                            else "the token is not valid")
        if needs == "submit" and role != "submit":
            raise AuthError(403, "this token may only read; submitting and cancelling need a 'submit' token")
        return role


def bearer(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer TOKEN`` header."""
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


__all__ = ["Tokens", "TokensError", "AuthError", "bearer", "ROLES"]

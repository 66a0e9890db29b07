"""Who is signed in to the dashboard: server-side sessions, their cookie and CSRF tokens.

- Sign-in takes a team's API key (that team's view) or the operator token (``[core]
  operator_token``: every team). The session keeps the secret in this process's memory only and
  checks it again on every request, so a revoked key or a changed token signs the session out.
- The cookie (:data:`COOKIE`) holds a random session id only: ``HttpOnly``, ``SameSite=Strict``,
  ``Path=/dashboard``, ``Secure`` over HTTPS. Sessions die with the process (a restart signs
  everyone out) and after ``session_ttl_s``.
- Every state-changing request (``POST``) carries the session's CSRF token in the form field
  ``csrf`` (or header ``X-CSRF-Token``); a mismatch is refused. The sign-in form itself is a
  double submit: a random pre-session cookie equal to its hidden field.
"""

from __future__ import annotations

import hmac
import secrets
import time
from dataclasses import dataclass

from cube_core import AuthError, SandboxService, Team

COOKIE = "cube_dashboard"
LOGIN_COOKIE = "cube_dashboard_login"
PATH = "/dashboard"


@dataclass(frozen=True)
class Viewer:
    """The signed-in caller of one request: a team, or the operator (``team_id`` None)."""

    team_id: str | None
    name: str
    csrf: str
    session_id: str

    @property
    def operator(self) -> bool:
        return self.team_id is None


@dataclass
class Session:
    session_id: str
    csrf: str
    secret: str
    operator: bool
    expires: float


class Sessions:
    def __init__(self, service: SandboxService, ttl_s: int) -> None:
        self.service = service
        self.ttl_s = ttl_s
        self._by_id: dict[str, Session] = {}

    def _operator_token(self) -> str | None:
        return self.service.settings.operator_secret()

    def _is_operator(self, secret: str) -> bool:
        token = self._operator_token()
        return token is not None and hmac.compare_digest(secret.encode(), token.encode())

    def sign_in(self, secret: str) -> Session:
        """A new session for an API key or the operator token; :class:`AuthError` otherwise."""
        secret = secret.strip()
        operator = self._is_operator(secret)
        if not operator:
            self.service.authenticate(secret)  # AuthError when it is no key
        now = time.monotonic()
        for sid in [s for s, v in self._by_id.items() if v.expires <= now]:
            del self._by_id[sid]
        session = Session(session_id=secrets.token_urlsafe(32), csrf=secrets.token_urlsafe(32), secret=secret,
                          operator=operator, expires=now + self.ttl_s)
        self._by_id[session.session_id] = session
        return session

    def viewer(self, session_id: str | None) -> Viewer | None:
        """Who the cookie's session is, checked now; None when there is none or it lapsed."""
        session = self._by_id.get(session_id or "")
        if session is None:
            return None
        if session.expires <= time.monotonic():
            self.sign_out(session.session_id)
            return None
        if session.operator:
            if not self._is_operator(session.secret):
                self.sign_out(session.session_id)
                return None
            return Viewer(team_id=None, name="operator (all teams)", csrf=session.csrf,
                          session_id=session.session_id)
        try:
            team: Team = self.service.authenticate(session.secret)
        except AuthError:
            self.sign_out(session.session_id)
            return None
        return Viewer(team_id=team.team_id, name=team.name, csrf=session.csrf, session_id=session.session_id)

    def sign_out(self, session_id: str) -> None:
        self._by_id.pop(session_id, None)


def csrf_ok(expected: str, presented: str | None) -> bool:
    return bool(presented) and hmac.compare_digest(expected.encode(), (presented or "").encode())

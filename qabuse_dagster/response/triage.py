"""The triage page: an analyst judges an alert, an approver rules on a proposal, in a browser.

Server-rendered HTML (Jinja2, autoescaped) and plain forms; no script runs on the page,
and its Content-Security-Policy allows none. The gateway serves it under ``/triage``
(:func:`~qabuse_dagster.response.gateway.create_gateway_app` with ``alerts`` and
``triage_ledger``):

* ``GET|POST /triage/login``, ``POST /triage/logout``: a principal signs in with its
  bearer token (:class:`~qabuse_dagster.response.auth.TokenStore`) and gets a session
  cookie, signed with the deployment's key and good for 8 hours.
* ``GET /triage``: open alerts by score, then impact (``?action=``, ``?family=``), the
  escalated ones, and what waits for a person (:func:`review.review_queue`).
* ``GET /triage/alerts/{alert_id}``: the alert in full, with its buttons;
  ``.../sparkline.png``: its last hour as a PNG.
* ``GET /triage/keys/{api_key_id}``: the key's ledger entries and alerts.
* ``POST /triage/alerts/{alert_id}/{release|escalate|false-positive|confirm-abuse}`` and
  ``POST /triage/queue/{seq}/{approve|deny}``: the steps of :mod:`review`, each a ledger
  entry in the principal's name; the alert's triage status follows.

Every page but the login needs a session of an ``analyst`` or ``approver``; a step
needs the role :data:`review.STEP_ROLES` names. Every POST carries the session's CSRF
nonce (the login form its own, from a short-lived cookie). The cookies are ``HttpOnly``,
``SameSite=Strict`` and, over HTTPS, ``Secure``; a link followed from elsewhere (a chat
message) therefore arrives without the session and goes through the login, which then
returns to it.
"""

from __future__ import annotations

import hmac
import json
import re
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qsl, quote, urlsplit

from itsdangerous import BadSignature, URLSafeTimedSerializer
from jinja2 import Environment, FileSystemLoader, StrictUndefined
from markupsafe import Markup
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from qabuse_dagster.response import review
from qabuse_dagster.response.alert_store import AlertStore, StoredAlert
from qabuse_dagster.response.alerts import Alert
from qabuse_dagster.response.auth import Principal, TokenStore, hash_token
from qabuse_dagster.response.challenge import epoch_ms
from qabuse_dagster.response.ledger import Ledger
from qabuse_dagster.response.sparkline import sparkline_png, sparkline_svg
from qabuse_dagster.telemetry.contract import HEX_HASH_PATTERN

__all__ = [
    "ALERT_STEPS",
    "CONTENT_SECURITY_POLICY",
    "CSRF_FIELD",
    "SESSION_COOKIE",
    "SESSION_MAX_AGE_S",
    "SESSION_SALT",
    "VIEWER_ROLES",
    "triage_routes",
]

SESSION_COOKIE = "qabuse_triage"
SESSION_SALT = "qabuse-triage"
SESSION_MAX_AGE_S = 8 * 3600
#: The login form's own CSRF nonce, before there is a session to hold one.
LOGIN_COOKIE = "qabuse_triage_login"
LOGIN_SALT = "qabuse-triage-login"
LOGIN_MAX_AGE_S = 3600
CSRF_FIELD = "csrf"
#: Who may look at the page; each step needs its own role on top (review.STEP_ROLES).
VIEWER_ROLES = ("analyst", "approver")
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; "
    "form-action 'self'; frame-ancestors 'none'"
)
_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Alerts name keys and users: no shared cache keeps a copy, no back button shows one.
    "Cache-Control": "no-store",
}
#: The buttons of an alert: the path's step -> review.py's step.
ALERT_STEPS: Mapping[str, str] = review.ALERT_STEPS
_QUEUE_STEPS = ("approve", "deny")
#: What a step's redirect says on the next page: fixed words, never text from the URL.
_DONE = {
    "release": "Released: the key's restrictions are lifted.",
    "escalate": "Escalated.",
    "false-positive": "Marked a false positive: labelled, and released if restricted.",
    "confirm-abuse": "Confirmed abuse: the incident is labelled.",
    "approve": "Approved.",
    "deny": "Denied.",
}
_MAX_FORM_BYTES = 16_384
_MAX_FORM_FIELDS = 16
_MAX_REASON = 2000
_ALERT_ID = re.compile(r"^[0-9a-f]{32}$")
_API_KEY_ID = re.compile(HEX_HASH_PATTERN)
#: Where the login or a step may send a person back to: a triage page, without a query.
_NEXT = re.compile(r"^/triage(?:/(?!\.\.?(?:/|$))[A-Za-z0-9._~-]+)*$")
_TEMPLATES = Path(__file__).parent / "templates"
_R = TypeVar("_R", bound=Response)


@dataclass(frozen=True)
class _Session:
    principal: Principal
    csrf: str


class _Refused(Exception):
    """A request answered with an HTML page instead: 400, 403, 404, 409 or 413."""

    def __init__(self, status: int, message: str, back: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.back = back


def triage_routes(
    *,
    alerts: AlertStore,
    ledger: Ledger,
    tokens: TokenStore,
    signing_key: bytes,
    labels_path: Path,
    clock: Callable[[], int] | None = None,
) -> list[BaseRoute]:
    """The triage page's routes, all under ``/triage`` (see the module docstring).

    Args:
        alerts: The alert store the queue shows and the steps update.
        ledger: The decision ledger each step writes to.
        tokens: The principals that may sign in, by bearer token.
        signing_key: The deployment's signing key: session cookies are signed with it.
        labels_path: The incident-labels file analysts' labels go to.
        clock: Epoch milliseconds (tests pass a fake one); the wall clock if None.

    Example:
        >>> from starlette.applications import Starlette
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     from qabuse_dagster.response.ledger import open_ledger
        ...     with AlertStore(Path(d) / "a.db") as store, open_ledger(
        ...             f"sqlite:///{d}/l.db", key=b"k" * 32) as ledger:
        ...         app = Starlette(routes=triage_routes(
        ...             alerts=store, ledger=ledger, tokens=TokenStore(),
        ...             signing_key=b"s" * 32, labels_path=Path(d) / "labels.jsonl"))
    """
    page = _TriagePage(alerts, ledger, tokens, signing_key, labels_path, clock or epoch_ms)
    return [
        Route("/triage", page.queue, methods=["GET"]),
        Route("/triage/login", page.login_form, methods=["GET"]),
        Route("/triage/login", page.login, methods=["POST"]),
        Route("/triage/logout", page.logout, methods=["POST"]),
        Route("/triage/alerts/{alert_id}", page.alert, methods=["GET"]),
        Route("/triage/alerts/{alert_id}/sparkline.png", page.sparkline, methods=["GET"]),
        Route("/triage/alerts/{alert_id}/{step}", page.alert_step, methods=["POST"]),
        Route("/triage/keys/{api_key_id}", page.key, methods=["GET"]),
        Route("/triage/queue/{seq:int}/{step}", page.queue_step, methods=["POST"]),
    ]


class _TriagePage:
    """The endpoints, over the stores they share."""

    def __init__(
        self,
        alerts: AlertStore,
        ledger: Ledger,
        tokens: TokenStore,
        signing_key: bytes,
        labels_path: Path,
        clock: Callable[[], int],
    ) -> None:
        self.alerts = alerts
        self.ledger = ledger
        self.tokens = tokens
        self.labels_path = labels_path
        self.clock = clock
        self.sessions = URLSafeTimedSerializer(signing_key, salt=SESSION_SALT)
        self.login_nonces = URLSafeTimedSerializer(signing_key, salt=LOGIN_SALT)
        self.env = Environment(
            loader=FileSystemLoader(_TEMPLATES),
            autoescape=True,
            undefined=StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.filters["utc"] = _utc
        self.env.filters["web_url"] = _web_url
        self.env.tests["api_key_id"] = lambda value: (
            isinstance(value, str) and bool(_API_KEY_ID.match(value))
        )

    # Pages.

    async def login_form(self, request: Request) -> Response:
        return self._login_page(_next_path(request.query_params.get("next")), None, 200)

    async def login(self, request: Request) -> Response:
        try:
            form = await _form(request)
        except _Refused as refused:
            return self._refusal(None, refused)
        target = _next_path(form.get("next"))
        if not self._login_nonce_ok(request, form):
            return self._login_page(target, "The login form expired: try again.", 403)
        principal = self.tokens.authenticate(form.get("token", "").strip())
        if principal is None:
            return self._login_page(target, "Unknown token.", 403)
        if not principal.has_role(*VIEWER_ROLES):
            message = f"The triage page needs the role {' or '.join(VIEWER_ROLES)}."
            return self._login_page(target, message, 403)
        session = {
            "name": principal.name,
            "roles": sorted(principal.roles),
            "token": _token_ref(form["token"].strip()),
            "csrf": secrets.token_urlsafe(32),
        }
        response = _secured(RedirectResponse(target, 303))
        response.set_cookie(
            SESSION_COOKIE,
            self.sessions.dumps(session),
            max_age=SESSION_MAX_AGE_S,
            path="/triage",
            secure=request.url.scheme == "https",
            httponly=True,
            samesite="strict",
        )
        response.delete_cookie(LOGIN_COOKIE, path="/triage/login")
        return response

    async def logout(self, request: Request) -> Response:
        session = self._session(request)
        if session is None:
            return _to_login(None)
        try:
            form = await _form(request)
            if not _csrf_ok(form, session.csrf):
                raise _Refused(403, "The form's CSRF token is missing or stale.")
        except _Refused as refused:
            return self._refusal(session, refused)
        response = _secured(RedirectResponse("/triage/login", 303))
        response.delete_cookie(SESSION_COOKIE, path="/triage")
        return response

    async def queue(self, request: Request) -> Response:
        session = self._session(request)
        if session is None:
            return _to_login(request)
        action = _choice(request.query_params.get("action"))
        family = _choice(request.query_params.get("family"))

        def read() -> dict[str, Any]:
            open_alerts = self.alerts.alerts(status="open")
            shown = self.alerts.alerts(status="open", action=action, family=family)
            return {
                "alerts": shown,
                "escalated": self.alerts.alerts(status="escalated"),
                "waiting": review.review_queue(self.ledger),
                "actions": _options([s.alert.action for s in open_alerts], action),
                "families": _options([s.alert.top_family for s in open_alerts], family),
            }

        context = await run_in_threadpool(read)
        return self._page(
            "queue.html",
            session,
            request,
            selected_action=action,
            selected_family=family,
            **context,
        )

    async def alert(self, request: Request) -> Response:
        session = self._session(request)
        if session is None:
            return _to_login(request)
        try:
            stored = await self._stored_alert(request)
        except _Refused as refused:
            return self._refusal(session, refused)
        alert = stored.alert
        now = self.clock()

        def read() -> dict[str, Any]:
            waiting = [
                item
                for item in review.review_queue(self.ledger)
                if item.api_key_id == alert.api_key_id
            ]
            in_force = review.restrictions_in_force(self.ledger, alert.api_key_id, now)
            return {"waiting": waiting, "in_force": in_force}

        context = await run_in_threadpool(read)
        return self._page(
            "alert.html",
            session,
            request,
            stored=stored,
            alert=alert,
            sparkline=Markup(sparkline_svg(alert.minutes, element_id="sparkline")),
            campaign=(
                None
                if alert.campaign is None
                else json.dumps(alert.campaign, indent=2, sort_keys=True, default=str)
            ),
            **context,
        )

    async def sparkline(self, request: Request) -> Response:
        session = self._session(request)
        if session is None:
            return _to_login(request)
        try:
            stored = await self._stored_alert(request)
        except _Refused as refused:
            return self._refusal(session, refused)
        png = await run_in_threadpool(sparkline_png, stored.alert.minutes)
        return _secured(Response(png, media_type="image/png"))

    async def key(self, request: Request) -> Response:
        session = self._session(request)
        if session is None:
            return _to_login(request)
        api_key_id = request.path_params["api_key_id"]
        if not _API_KEY_ID.match(api_key_id):
            return self._refusal(session, _Refused(404, "No such api key id."))
        now = self.clock()

        def read() -> dict[str, Any]:
            return {
                "records": [r for r in self.ledger.records() if r.entry.api_key_id == api_key_id],
                "alerts": self.alerts.alerts(status=None, api_key_id=api_key_id),
                "in_force": review.restrictions_in_force(self.ledger, api_key_id, now),
                "waiting": [
                    item
                    for item in review.review_queue(self.ledger)
                    if item.api_key_id == api_key_id
                ],
            }

        context = await run_in_threadpool(read)
        return self._page("key.html", session, request, api_key_id=api_key_id, **context)

    # Steps.

    async def alert_step(self, request: Request) -> Response:
        session = self._session(request)
        if session is None:
            return _to_login(None)
        path_step = request.path_params["step"]
        try:
            form = await _form(request)
            if not _csrf_ok(form, session.csrf):
                raise _Refused(403, "The form's CSRF token is missing or stale.")
            if path_step not in ALERT_STEPS:
                raise _Refused(404, "No such step.")
            step = ALERT_STEPS[path_step]
            self._require(session.principal, step)
            stored = await self._stored_alert(request)
            back = f"/triage/alerts/{stored.alert_id}"
            reason = _reason(form, path_step)
            kind = form.get("kind", "").strip() or review.CONFIRMED_ABUSE_KIND
            await run_in_threadpool(
                self._take_alert_step, session.principal, stored.alert, step, reason, kind
            )
        except _Refused as refused:
            return self._refusal(session, refused)
        return _secured(RedirectResponse(f"{back}?done={path_step}", 303))

    async def queue_step(self, request: Request) -> Response:
        session = self._session(request)
        if session is None:
            return _to_login(None)
        step, seq = request.path_params["step"], int(request.path_params["seq"])
        try:
            form = await _form(request)
            if not _csrf_ok(form, session.csrf):
                raise _Refused(403, "The form's CSRF token is missing or stale.")
            if step not in _QUEUE_STEPS:
                raise _Refused(404, "No such step.")
            self._require(session.principal, step)
            # Back to the page the form was on (the queue, an alert, a key): a triage page.
            back = _next_path(form.get("back"))
            reason = _reason(form, step)
            now = self.clock()
            take = review.approve if step == "approve" else review.deny
            try:
                await run_in_threadpool(
                    take, self.ledger, session.principal, seq, reason, now_ms=now
                )
            except review.ReviewError as exc:
                raise _Refused(409, str(exc), back) from None
        except _Refused as refused:
            return self._refusal(session, refused)
        return _secured(RedirectResponse(f"{back}?done={step}", 303))

    def _take_alert_step(
        self, principal: Principal, alert: Alert, step: str, reason: str, kind: str
    ) -> None:
        try:
            review.act_on_alert(
                self.ledger,
                self.alerts,
                principal,
                alert,
                step,
                reason,
                labels_path=self.labels_path,
                kind=kind,
                now_ms=self.clock(),
            )
        except review.ReviewError as exc:
            raise _Refused(409, str(exc), f"/triage/alerts/{alert.alert_id}") from None

    # Sessions.

    def _session(self, request: Request) -> _Session | None:
        """The signed-in principal, or None for no, a forged, an expired or a stale session."""
        raw = request.cookies.get(SESSION_COOKIE)
        if not raw:
            return None
        try:
            data = self.sessions.loads(raw, max_age=SESSION_MAX_AGE_S)
        except BadSignature:  # SignatureExpired is one too
            return None
        if not isinstance(data, dict):
            return None
        name, roles, token, csrf = (data.get(k) for k in ("name", "roles", "token", "csrf"))
        if not (isinstance(name, str) and isinstance(token, str) and isinstance(csrf, str)):
            return None
        if not isinstance(roles, list):
            return None
        # The session lasts while its token does: a token taken out of the store ends it,
        # and the roles are the store's, never more than the session was given.
        for entry in self.tokens.entries:
            if entry.principal.name == name and _token_ref_of(entry.token_sha256) == token:
                held = entry.principal.roles & frozenset(roles)
                if not held & frozenset(VIEWER_ROLES):
                    return None
                return _Session(Principal(name, held, entry.principal.api_keys), csrf)
        return None

    def _login_nonce_ok(self, request: Request, form: Mapping[str, str]) -> bool:
        raw = request.cookies.get(LOGIN_COOKIE)
        if not raw:
            return False
        try:
            nonce = self.login_nonces.loads(raw, max_age=LOGIN_MAX_AGE_S)
        except BadSignature:
            return False
        return isinstance(nonce, str) and _csrf_ok(form, nonce)

    def _require(self, principal: Principal, step: str) -> None:
        roles = review.STEP_ROLES[step]
        if not principal.has_role(*roles):
            raise _Refused(403, f"{principal.name} needs the role {' or '.join(roles)}.")

    async def _stored_alert(self, request: Request) -> StoredAlert:
        alert_id = request.path_params["alert_id"]
        stored = (
            await run_in_threadpool(self.alerts.get, alert_id)
            if _ALERT_ID.match(alert_id)
            else None
        )
        if stored is None:
            raise _Refused(404, "No such alert.", "/triage")
        return stored

    # Rendering.

    def _render(self, template: str, status: int, **context: Any) -> HTMLResponse:
        html = self.env.get_template(template).render(**context)
        return _secured(HTMLResponse(html, status))

    def _page(
        self, template: str, session: _Session, request: Request, **context: Any
    ) -> HTMLResponse:
        principal = session.principal
        return self._render(
            template,
            200,
            principal=principal,
            csrf=session.csrf,
            can={step: principal.has_role(*roles) for step, roles in review.STEP_ROLES.items()},
            notice=_DONE.get(request.query_params.get("done", "")),
            error=None,
            **context,
        )

    def _refusal(self, session: _Session | None, refused: _Refused) -> HTMLResponse:
        return self._render(
            "message.html",
            refused.status,
            principal=None if session is None else session.principal,
            csrf=None if session is None else session.csrf,
            notice=None,
            error=refused.message,
            back=refused.back or "/triage",
        )

    def _login_page(self, target: str, error: str | None, status: int) -> HTMLResponse:
        nonce = secrets.token_urlsafe(32)
        response = self._render(
            "login.html",
            status,
            principal=None,
            csrf=nonce,
            notice=None,
            error=error,
            next=target,
        )
        response.set_cookie(
            LOGIN_COOKIE,
            self.login_nonces.dumps(nonce),
            max_age=LOGIN_MAX_AGE_S,
            path="/triage/login",
            httponly=True,
            samesite="strict",
        )
        return response


def _secured(response: _R) -> _R:
    response.headers.update(_HEADERS)
    return response


def _to_login(request: Request | None) -> Response:
    """303 to the login; from a page (a GET), with the way back."""
    target = "/triage/login"
    if request is not None and request.url.path != "/triage":
        target += "?next=" + quote(request.url.path, safe="/")
    return _secured(RedirectResponse(target, 303))


def _next_path(value: str | None) -> str:
    """Where to go after the login or a step: a triage page, or the queue (never elsewhere)."""
    if value and _NEXT.match(value) and not urlsplit(value).netloc:
        return value
    return "/triage"


async def _form(request: Request) -> dict[str, str]:
    """The body as an HTML form (``application/x-www-form-urlencoded``), read up to a limit.

    Raises:
        _Refused: 413 for a body over the limit, 400 for one that is no such form.
    """
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > _MAX_FORM_BYTES:
            raise _Refused(413, f"The form is over {_MAX_FORM_BYTES} bytes.")
    try:
        pairs = parse_qsl(
            body.decode("utf-8"),
            keep_blank_values=True,
            strict_parsing=False,
            max_num_fields=_MAX_FORM_FIELDS,
        )
    except (UnicodeDecodeError, ValueError):
        raise _Refused(400, "The form does not read.") from None
    return dict(pairs)


def _csrf_ok(form: Mapping[str, str], nonce: str) -> bool:
    sent = form.get(CSRF_FIELD, "")
    # Bytes: compare_digest refuses non-ASCII str, and a form may send anything.
    return bool(sent) and hmac.compare_digest(sent.encode(), nonce.encode())


def _token_ref(token: str) -> str:
    return _token_ref_of(hash_token(token))


def _token_ref_of(token_sha256: str) -> str:
    """Which token a session came from: a prefix of its SHA-256, as the store keeps it."""
    return token_sha256[:16]


def _reason(form: Mapping[str, str], step: str) -> str:
    """The form's reason; a button pressed without one still says where it came from."""
    reason = form.get("reason", "").strip()
    return reason[:_MAX_REASON] if reason else f"{step} on the triage page"


def _choice(value: str | None) -> str | None:
    """A filter's value: None for none, or a value cut to a sane length."""
    return value[:64] if value else None


def _options(values: Sequence[str | None], selected: str | None) -> list[str]:
    """A select's options: the values present, and the selected one even if none is."""
    present = {v for v in values if v}
    if selected:
        present.add(selected)
    return sorted(present)


def _utc(value: datetime | int | None) -> str:
    """An instant (aware datetime or epoch milliseconds) as UTC ISO 8601, to the second."""
    if value is None:
        return ""
    moment = (
        datetime.fromtimestamp(value / 1000, UTC)
        if isinstance(value, int)
        else value.astimezone(UTC)
    )
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _web_url(value: str | None) -> str | None:
    """``value`` if it is an http(s) URL, to link to; None for anything else (``javascript:``)."""
    if not value:
        return None
    parts = urlsplit(value)
    return value if parts.scheme in ("http", "https") and parts.netloc else None

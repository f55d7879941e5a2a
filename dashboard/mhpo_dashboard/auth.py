"""The dashboard's login, for servers that require API tokens.

A viewer pastes an API token once into the form at `/login`. The dashboard checks it with
the API (`GET /api/v1/auth/whoami`) and keeps it in a session cookie that is encrypted and
authenticated (Fernet: AES-CBC + HMAC-SHA256, with an expiry), so the token cannot be read
or forged from the cookie; the cookie is HttpOnly, SameSite=Lax, and Secure over https.

`install_login` adds a guard before every request of the Dash server. Static files
(`assets/`, `_dash-component-suites/`, the favicon) hold no data and pass. Everything else
(pages, `_dash-layout`, `_dash-dependencies`, `_dash-update-component`) acts as the viewer:
the guard re-checks the session's token with the API on each request, so a revoked token
stops working on the next one, and without a valid session pages redirect to the form
while Dash's routes answer 401. A POST whose `Origin` (or, without it, `Referer`) names
another host is refused with 403, on top of SameSite=Lax: no other site can log a viewer in
with its own token or act through the viewer's session. A public read token, when given,
is used for viewers who have not logged in.
"""

from __future__ import annotations

import base64
import hashlib
import html
import os
import re
import secrets
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict
from urllib.parse import quote, urlsplit

import flask
from cryptography.fernet import Fernet, InvalidToken
from werkzeug.wrappers import Response

from mhpo_dashboard.api import ApiClient, ApiError

__all__ = ["COOKIE", "SECRET_FILE", "Sessions", "Viewer", "install_login", "load_or_create_secret", "viewer"]

COOKIE = "mhpo_session"
SECRET_FILE = "dashboard-secret"
VIEWER_KEY = "mhpo_viewer"
MAX_TOKEN_CHARS = 512
PUBLIC_PATHS = ("assets/", "_dash-component-suites/", "_favicon.ico")
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}
LOCAL_PATH = re.compile(r"/(?!/)[A-Za-z0-9\-._~!$&'()*+,;=:@/%?]*")  # a path, no host, no whitespace or backslash


class CookieArgs(TypedDict):
    """The session cookie's attributes, the same when it is set and when it is deleted."""

    path: str
    httponly: bool
    samesite: str
    secure: bool


@dataclass(frozen=True)
class Viewer:
    """Whose token the current request acts with (`public`: the public read token, nobody logged in)."""

    token: str | None
    project: str | None
    scope: str
    public: bool = False


def viewer() -> Viewer | None:
    """The viewer of the current request (None when the dashboard has no login)."""
    return flask.g.get(VIEWER_KEY)


def load_or_create_secret(directory: Path) -> bytes:
    """The key in `directory/dashboard-secret`, created once (mode 0600) if absent.

    Written to a temporary file and hard-linked into place, so processes starting together
    all end up with the same key and none reads a half-written file.
    """
    path = directory / SECRET_FILE
    if not path.exists():
        directory.mkdir(parents=True, exist_ok=True)
        temporary = directory / f".{SECRET_FILE}.{uuid.uuid4().hex}"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_urlsafe(32) + "\n")
        try:
            os.link(temporary, path)
        except FileExistsError:
            pass
        finally:
            temporary.unlink()
    secret = path.read_bytes().strip()
    if len(secret) < 16:
        raise ValueError(
            f"{path} holds {len(secret)} bytes; a dashboard secret needs at least 16: delete the file "
            "to have a new one generated, or set MHPO_DASHBOARD_SECRET"
        )
    return secret


class Sessions:
    """Seals a viewer's API token into a cookie value and opens it again (None if forged or expired)."""

    def __init__(self, secret: bytes, max_age_s: float) -> None:
        if len(secret) < 16:
            raise ValueError(f"the dashboard secret has {len(secret)} bytes; use at least 16 random bytes")
        key = hashlib.sha256(b"mhpo dashboard session cookie\0" + secret).digest()
        self._fernet = Fernet(base64.urlsafe_b64encode(key))
        self.max_age_s = max(1, int(max_age_s))

    def seal(self, token: str) -> str:
        return self._fernet.encrypt(token.encode()).decode("ascii")

    def open(self, cookie: str) -> str | None:
        try:
            return self._fernet.decrypt(cookie.encode("ascii"), ttl=self.max_age_s).decode()
        except (InvalidToken, UnicodeError):
            return None


LOGIN_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Log in · MHPO Monitor</title>
<link rel="icon" href="{prefix}_favicon.ico"><link rel="stylesheet" href="{prefix}assets/style.css"></head>
<body><nav class="nav"><a class="brand" href="{prefix}">MHPO Monitor</a></nav>
<main class="page login">
<h2>Log in</h2>
<p>This server requires API tokens. Paste a token made with
<code>mhpo token create --project P --scope read</code> (or <code>write</code>, to edit alert rules);
the dashboard then shows that token's project with its rights.</p>
<form method="post" action="{prefix}login" class="login-form">
<input type="hidden" name="next" value="{next}">
<label class="field"><span>API token</span>
<input id="login-token" name="token" type="password" autocomplete="off" spellcheck="false" required></label>
<button id="login-submit" type="submit">log in</button>
</form>
<p id="login-message" class="error">{message}</p>
</main></body></html>
"""


def install_login(
    app: flask.Flask,
    api: ApiClient,
    sessions: Sessions,
    requests_prefix: str,
    routes_prefix: str,
    public_token: str | None = None,
    cookie_secure: bool | None = None,
) -> None:
    """Add `/login`, `/logout` and the per-request guard (see the module docstring) to the Dash server."""

    def cookie_args() -> CookieArgs:
        secure = flask.request.scheme == "https" if cookie_secure is None else cookie_secure
        return {"path": requests_prefix, "httponly": True, "samesite": "Lax", "secure": secure}

    def local_next(target: str | None) -> str:
        """`target` if it is a path of this dashboard, never a way to another site (`//host`, backslashes, tabs)."""
        if not target or not LOCAL_PATH.fullmatch(target) or not target.startswith(requests_prefix):
            return requests_prefix
        return target

    def login_page(message: str = "", status: int = 200, target: str | None = None) -> flask.Response:
        body = LOGIN_PAGE.format(
            prefix=html.escape(requests_prefix), message=html.escape(message), next=html.escape(local_next(target))
        )
        response = flask.Response(body, status=status, mimetype="text/html")
        response.headers["Cache-Control"] = "no-store"
        return response

    def login() -> Response:
        if flask.request.method == "GET":
            return login_page(target=flask.request.args.get("next"))
        token = flask.request.form.get("token", "").strip()
        target = flask.request.form.get("next")
        if not token or len(token) > MAX_TOKEN_CHARS or not token.isascii():
            return login_page("paste an API token (the line `mhpo token create` printed)", 400, target)
        try:
            who = api.as_viewer(token).whoami()
        except ApiError as exc:
            if exc.status in (401, 403):  # the form again, as a page (200): a mistyped token is no fault
                return login_page("the server does not know this token (mistyped, or revoked)", 200, target)
            return login_page(f"cannot check the token with the API: {exc}", 502, target)
        response = flask.redirect(local_next(target), code=303)
        response.set_cookie(COOKIE, sessions.seal(token), max_age=sessions.max_age_s, **cookie_args())
        response.headers["Cache-Control"] = "no-store"
        app.logger.info("dashboard login for project %r (%s)", who.get("project"), who.get("scope"))
        return response

    def logout() -> Response:
        response = flask.redirect(requests_prefix + "login", code=303)
        response.delete_cookie(COOKIE, **cookie_args())
        return response

    def same_origin() -> bool:
        source = flask.request.headers.get("Origin") or flask.request.headers.get("Referer")
        if source is None:
            return True  # not sent by a browser (browsers send Origin with every POST)
        return urlsplit(source).netloc == flask.request.host

    def refuse(message: str, clear_cookie: bool = False) -> Response:
        """Dash's own routes and non-GETs get 401 JSON; a page gets a redirect to the form."""
        relative = flask.request.path[len(routes_prefix) :]
        if relative.startswith("_dash-") or flask.request.method not in SAFE_METHODS:
            response: Response = flask.jsonify(detail=message)
            response.status_code = 401
        else:
            here = requests_prefix + relative
            if flask.request.query_string:
                here += "?" + flask.request.query_string.decode("latin-1")
            response = flask.redirect(f"{requests_prefix}login?next={quote(here, safe='')}", code=303)
        if clear_cookie:
            response.delete_cookie(COOKIE, **cookie_args())
        return response

    def guard() -> Response | None:
        relative = flask.request.path[len(routes_prefix) :] if flask.request.path.startswith(routes_prefix) else ""
        if relative.startswith(PUBLIC_PATHS):
            return None
        if flask.request.method not in SAFE_METHODS and not same_origin():
            response = flask.jsonify(
                detail="refused: this POST comes from another site (Origin/Referer does not "
                f"match {flask.request.host})"
            )
            response.status_code = 403
            return response
        if relative in ("login", "logout"):
            return None
        sealed = flask.request.cookies.get(COOKIE)
        token = sessions.open(sealed) if sealed else None
        if token is None and public_token is None:
            return refuse("log in first: open /login and paste an API token", clear_cookie=sealed is not None)
        try:
            who = api.as_viewer(token or public_token).whoami()
        except ApiError as exc:
            if exc.status in (401, 403):
                return refuse("the API no longer accepts this token (revoked?): log in again", clear_cookie=True)
            response = flask.jsonify(detail=f"cannot check the token with the API: {exc}")
            response.status_code = 502
            return response
        setattr(
            flask.g,
            VIEWER_KEY,
            Viewer(
                token=token or public_token,
                project=who.get("project"),
                scope=str(who.get("scope")),
                public=token is None,
            ),
        )
        return None

    app.add_url_rule(f"{routes_prefix}login", "mhpo_login", login, methods=["GET", "POST"])
    app.add_url_rule(f"{routes_prefix}logout", "mhpo_logout", logout, methods=["GET", "POST"])
    app.before_request(guard)

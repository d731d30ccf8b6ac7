"""examples/django_site, a small real Django project, under ``circus-wsgi serve``: its
admin's login with a real POST and CSRF cookie, a model saved to SQLite through the
admin, and static files collected by Django and served by mongrel2.

The project runs unchanged from the repository; its database and collected static
files go to a temporary directory (DJANGO_DB, DJANGO_STATIC_ROOT).
"""

from __future__ import annotations

import re
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
import requests

from harness import PROJECT_DIR, python_env, wait_for
from test_serve import Serve, scratch, start_serve

SITE = PROJECT_DIR / "examples" / "django_site"
ADMIN, PASSWORD = "admin", "circus-wsgi-admin-1"


def manage(env: dict, *args: str) -> None:
    subprocess.run([sys.executable, "manage.py", *args], cwd=str(SITE), env=env, check=True,
                   capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def site() -> Iterator[tuple[Serve, Path]]:
    """The site migrated into a fresh SQLite file, with a superuser, served."""
    with scratch() as directory:
        env = {**python_env(), "DJANGO_DB": str(directory / "db.sqlite3"),
               "DJANGO_STATIC_ROOT": str(directory / "static"),
               "DJANGO_SUPERUSER_PASSWORD": PASSWORD}
        manage(env, "migrate", "--noinput")
        manage(env, "collectstatic", "--noinput")
        manage(env, "createsuperuser", "--noinput", "--username", ADMIN,
               "--email", "admin@example.com")
        served = start_serve(directory, "--chdir", str(SITE), "--static",
                             f"/static={directory / 'static'}", "--workers", "2",
                             app="django_site.wsgi:application", env=env)
        try:
            yield served, directory
        finally:
            served.stop()


def url(served: Serve, path: str) -> str:
    return f"http://127.0.0.1:{served.port}{path}"


def csrf_token(page: str) -> str:
    match = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page)
    assert match, page[:2000]
    return match.group(1)


def logged_in(served: Serve) -> requests.Session:
    """A session that logged in to the admin the way a browser does."""
    session = requests.Session()
    login = session.get(url(served, "/admin/login/?next=/admin/"), timeout=10)
    assert login.status_code == 200 and "csrftoken" in session.cookies
    reply = session.post(url(served, "/admin/login/?next=/admin/"), timeout=10, data={
        "csrfmiddlewaretoken": csrf_token(login.text), "username": ADMIN,
        "password": PASSWORD, "next": "/admin/"})
    assert reply.status_code == 200, reply.text[:2000]
    assert [r.status_code for r in reply.history] == [302]
    assert reply.url == url(served, "/admin/") and "sessionid" in session.cookies
    return session


def test_the_admin_login_works_with_a_real_post_and_the_csrf_cookie(site) -> None:
    served, _ = site
    page = logged_in(served).get(url(served, "/admin/"), timeout=10)
    assert page.status_code == 200
    assert "Site administration" in page.text and "Notes" in page.text
    assert f"<strong>{ADMIN}</strong>" in page.text  # "Welcome, admin."


def test_a_login_without_the_csrf_cookie_is_refused(site) -> None:
    served, _ = site
    token = csrf_token(requests.get(url(served, "/admin/login/"), timeout=10).text)
    reply = requests.post(url(served, "/admin/login/"), timeout=10, data={
        "csrfmiddlewaretoken": token, "username": ADMIN, "password": PASSWORD})
    assert reply.status_code == 403 and "CSRF" in reply.text


def test_a_note_added_in_the_admin_is_saved_in_sqlite_and_shown(site) -> None:
    served, directory = site
    session = logged_in(served)
    form = session.get(url(served, "/admin/notes/note/add/"), timeout=10)
    assert form.status_code == 200
    reply = session.post(url(served, "/admin/notes/note/add/"), timeout=10, data={
        "csrfmiddlewaretoken": csrf_token(form.text), "title": "Served by mongrel2",
        "body": "through circus-wsgi", "_save": "Save"})
    assert reply.status_code == 200 and reply.url == url(served, "/admin/notes/note/")
    with sqlite3.connect(directory / "db.sqlite3") as database:
        rows = database.execute("SELECT title, body FROM notes_note").fetchall()
    assert rows == [("Served by mongrel2", "through circus-wsgi")]
    front = requests.get(url(served, "/"), timeout=10)
    assert "<strong>Served by mongrel2</strong>" in front.text


@pytest.mark.parametrize("path", ["/static/admin/css/base.css", "/static/notes/notes.css"])
def test_static_files_are_served_by_mongrel2(site, path: str) -> None:
    served, directory = site
    reply = requests.get(url(served, path), timeout=10)
    assert reply.status_code == 200
    assert reply.content == (directory / path.removeprefix("/")).read_bytes()
    assert reply.headers["Content-Type"] == "text/css"
    assert "ETag" in reply.headers  # mongrel2's; Django (DEBUG off) serves no static file
    assert requests.get(url(served, "/?after-static"), timeout=10).status_code == 200
    wait_for(lambda: '"GET /?after-static ' in served.output(), 10, 0.05, "an access log line")
    assert f'"GET {path} ' not in served.output()  # the workers never saw it

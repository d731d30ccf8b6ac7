"""HTTPS (settings certfile, keyfile, ciphers): the certificate and key checked before
anything starts, what mongrel2 is told, and the real mongrel2 serving with a certificate
the test makes itself (trustme): TLS 1.2 with forward-secret AEAD suites only, the
app's wsgi.url_scheme https, TLS 1.0 and 1.1 and the weak suites refused."""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import sqlite3
import ssl
import stat
import subprocess
import warnings
from pathlib import Path
from typing import Iterator

import psutil
import pytest
import trustme
from cryptography.hazmat.primitives import serialization

from circus_wsgi import redirect, tls, write_configs
from circus_wsgi.mongrel2 import mongrel2_config
from circus_wsgi.settings import DEFAULT_CIPHERS, Settings, SettingsError
from harness import TESTS_DIR, free_port
from test_serve import CIRCUS_WSGI, Serve, preflight, scratch, start_serve

CA = trustme.CA()


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """PEM files: a certificate for 127.0.0.1 and localhost with its key, another
    certificate's key, the key with a passphrase, a file that is no PEM, and the CA."""
    directory = tmp_path_factory.mktemp("certs")
    leaf, other = CA.issue_cert("127.0.0.1", "localhost"), CA.issue_cert("example.com")
    files = {"cert": leaf.cert_chain_pems[0], "key": leaf.private_key_pem,
             "other_key": other.private_key_pem, "ca": CA.cert_pem}
    paths = {name: directory / f"{name}.pem" for name in files}
    for name, blob in files.items():
        blob.write_to_path(str(paths[name]))
    key = serialization.load_pem_private_key(leaf.private_key_pem.bytes(), None)
    paths["locked_key"] = directory / "locked_key.pem"
    paths["locked_key"].write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret")))
    paths["junk"] = directory / "junk.pem"
    paths["junk"].write_text("not a certificate\n")
    return paths


# -- the settings and the check before start


def test_https_needs_both_files() -> None:
    with pytest.raises(SettingsError, match="'certfile'.*HTTPS needs keyfile too"):
        Settings(certfile="/etc/ssl/a.pem")
    with pytest.raises(SettingsError, match="'keyfile'.*HTTPS needs certfile too"):
        Settings(keyfile="/etc/ssl/a.key")


@pytest.mark.parametrize("given, kept", [
    ("TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256", "TLS-ECDHE-RSA-WITH-AES-128-GCM-SHA256"),
    ("tls-ecdhe-rsa-with-aes-128-gcm-sha256, TLS-RSA-WITH-AES-128-CBC-SHA",
     "TLS-ECDHE-RSA-WITH-AES-128-GCM-SHA256 TLS-RSA-WITH-AES-128-CBC-SHA"),
    (DEFAULT_CIPHERS, DEFAULT_CIPHERS),
])
def test_ciphers_are_kept_in_mbedtls_spelling(given: str, kept: str) -> None:
    assert Settings(ciphers=given).ciphers == kept


@pytest.mark.parametrize("given", ["", "ECDHE+AESGCM", "HIGH:!aNULL", ["TLS-FOO"]])
def test_openssl_cipher_strings_are_refused(given: object) -> None:
    with pytest.raises(SettingsError, match="'ciphers'.*cipher suite names"):
        Settings(ciphers=given)


@pytest.mark.parametrize("cert, key, name, reason", [
    ("missing", "key", "certfile", "cannot read it: No such file or directory"),
    ("cert", "missing", "keyfile", "cannot read it: No such file or directory"),
    ("junk", "key", "certfile", "holds no PEM certificate"),
    ("key", "key", "certfile", "holds no PEM certificate"),
    ("cert", "junk", "keyfile", "holds no PEM private key"),
    ("cert", "other_key", "keyfile", "is not the key of certfile"),
    ("cert", "locked_key", "keyfile", "the key has a passphrase, which mongrel2 cannot ask"),
])
def test_a_bad_certificate_or_key_is_named_in_one_line(certs: dict, cert: str, key: str,
                                                        name: str, reason: str) -> None:
    paths = {**certs, "missing": certs["ca"].with_name("missing.pem")}
    settings = Settings(certfile=str(paths[cert]), keyfile=str(paths[key]))
    with pytest.raises(SettingsError) as caught:
        tls.check(settings)
    assert caught.value.name == name and reason in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_good_pair_passes_the_check(certs: dict) -> None:
    tls.check(Settings(certfile=str(certs["cert"]), keyfile=str(certs["key"])))
    tls.check(Settings())  # no HTTPS: nothing to check


def test_serve_refuses_a_key_of_another_certificate_before_starting(certs: dict) -> None:
    with scratch() as directory:
        result = preflight(directory, "serve_apps:app", "--chdir", str(TESTS_DIR),
                           "--bind", f"127.0.0.1:{free_port()}", "--run-dir",
                           str(directory / "run"), "--certfile", str(certs["cert"]),
                           "--keyfile", str(certs["other_key"]))
        assert f"setting 'keyfile': invalid value '{certs['other_key']}': is not the key " \
               f"of certfile {certs['cert']}" in result.stderr
        assert not (directory / "run").exists()


def test_config_refuses_a_missing_certificate_and_writes_nothing(certs: dict) -> None:
    with scratch() as directory:
        result = subprocess.run(
            [CIRCUS_WSGI, "config", "serve_apps:app", "--chdir", str(TESTS_DIR), "--out",
             str(directory / "out"), "--certfile", str(directory / "none.pem"), "--keyfile",
             str(certs["key"])], capture_output=True, text=True, timeout=60)
        assert result.returncode == 2, result.stderr
        assert result.stderr == f"circus-wsgi: error: setting 'certfile': invalid value " \
                                f"'{directory / 'none.pem'}': cannot read it: No such file " \
                                "or directory\n"
        assert not (directory / "out").exists()


# -- what mongrel2 is told


def test_the_files_go_where_mongrel2_reads_them_private(certs: dict, run_dir: Path) -> None:
    settings = Settings(app="serve_apps:app", chdir=str(TESTS_DIR), certfile=str(certs["cert"]),
                        keyfile=str(certs["key"]))
    paths = write_configs(settings, run_dir)
    resolved = settings.with_defaults_resolved(str(run_dir / "run"))
    config = mongrel2_config(resolved)
    assert config.use_ssl
    assert config.settings["ssl_ciphers"] == DEFAULT_CIPHERS
    certdir = Path(config.settings["certdir"])
    assert config.settings["certdir"].endswith("/") and certdir == run_dir / "run" / "certs"
    for suffix, source in ((".crt", "cert"), (".key", "key")):
        copy = certdir / f"{resolved.server_uuid}{suffix}"
        assert copy.read_bytes() == certs[source].read_bytes()
        assert stat.S_IMODE(copy.stat().st_mode) == 0o600
    assert stat.S_IMODE(certdir.stat().st_mode) == 0o700
    with sqlite3.connect(paths["config.sqlite"]) as db:
        assert db.execute("SELECT use_ssl FROM server").fetchall() == [(1,)]
        assert dict(db.execute("SELECT key, value FROM setting"))["ssl_ciphers"] == \
            DEFAULT_CIPHERS
    assert "use_ssl=1" in paths["mongrel2.conf"].read_text()


def test_plain_http_tells_mongrel2_nothing_of_tls() -> None:
    config = mongrel2_config(Settings(app="a:b").with_defaults_resolved("/tmp/x"))
    assert not config.use_ssl
    assert not {"certdir", "ssl_ciphers"} & set(config.settings)


# -- the real mongrel2


def _https_answers(port: int) -> bool:
    try:
        return get(port, "/").status == 200
    except (OSError, ssl.SSLError, http.client.HTTPException):
        return False


class Reply:
    def __init__(self, response: http.client.HTTPResponse, sock: ssl.SSLSocket) -> None:
        self.status, self.body = response.status, response.read()
        self.version, self.cipher = sock.version(), sock.cipher()[0]


def get(port: int, path: str, host: str = "127.0.0.1") -> Reply:
    context = ssl.create_default_context()
    CA.configure_trust(context)
    connection = http.client.HTTPSConnection(host, port, timeout=10, context=context)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return Reply(response, connection.sock)
    finally:
        connection.close()


@pytest.fixture(scope="module")
def https(certs: dict) -> Iterator[Serve]:
    """serve with HTTPS, and a plain-HTTP port that redirects to it (served.redirect)."""
    with scratch() as directory:
        redirect = free_port()
        served = start_serve(directory, "--workers", "1", "--certfile", str(certs["cert"]),
                             "--keyfile", str(certs["key"]), "--http-redirect",
                             f"127.0.0.1:{redirect}", app="worker_apps:rules",
                             answers=_https_answers)
        served.redirect = redirect
        try:
            yield served
        finally:
            served.process.stop(45)


def test_https_serves_and_the_app_sees_the_https_scheme(https: Serve) -> None:
    reply = get(https.port, "/environ")
    environ = json.loads(reply.body)
    assert reply.status == 200 and environ["wsgi.url_scheme"] == "https"
    assert reply.version == "TLSv1.2"
    assert reply.cipher in {"ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES256-GCM-SHA384",
                            "ECDHE-ECDSA-CHACHA20-POLY1305"}
    assert f"Serving worker_apps:rules at https://127.0.0.1:{https.port}/" in https.output()


def test_sni_for_a_name_without_its_own_file_gets_the_certificate(https: Serve) -> None:
    assert get(https.port, "/", host="localhost").status == 200


def _handshake(port: int, version: ssl.TLSVersion, ciphers: str = "ALL:@SECLEVEL=0") -> str:
    """The cipher the server agrees to, or the error that ended the handshake."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.0 and 1.1, on purpose
        context.minimum_version = context.maximum_version = version
    context.set_ciphers(ciphers)
    try:
        with socket.create_connection(("127.0.0.1", port), 10) as raw:
            with context.wrap_socket(raw) as sock:
                return sock.cipher()[0]
    except (ssl.SSLError, ConnectionError) as error:
        return f"refused: {error}"


@pytest.mark.parametrize("version", ["TLSv1", "TLSv1_1"])
def test_tls_1_0_and_1_1_handshakes_are_refused(https: Serve, version: str) -> None:
    outcome = _handshake(https.port, getattr(ssl.TLSVersion, version))
    assert outcome.startswith("refused:") and "HANDSHAKE_FAILURE" in outcome.upper()


@pytest.mark.parametrize("ciphers", ["AES128-SHA:AES256-GCM-SHA384", "ECDHE-ECDSA-AES128-SHA",
                                     "ECDHE-ECDSA-AES128-SHA256", "ECDHE-ECDSA-AES128-CCM8"])
def test_weak_suites_are_refused_in_tls_1_2(https: Serve, ciphers: str) -> None:
    assert _handshake(https.port, ssl.TLSVersion.TLSv1_2, ciphers).startswith("refused:")


def test_openssl_s_client_is_refused_tls_1_0(https: Serve) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    result = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{https.port}",
                             "-tls1", "-cipher", "ALL:@SECLEVEL=0"], input="",
                            capture_output=True, text=True, timeout=20)
    assert result.returncode != 0 and "alert handshake failure" in result.stderr


# -- the plain-HTTP port that redirects


@pytest.mark.parametrize("host, target, https_port, expected", [
    ("example.com", "/a?b=1", 443, "https://example.com/a?b=1"),
    ("Example.COM:80", "/", 8443, "https://example.com:8443/"),
    ("[::1]:8080", "/x", 443, "https://[::1]/x"),
    (None, "/", 443, None), ("", "/", 443, None), ("evil.com/x", "/", 443, None),
    ("a b", "/", 443, None), ("example.com", "//evil.com/", 443, None),
    ("example.com", "http://other/", 443, None),
])
def test_the_redirect_keeps_host_path_and_query(host: str | None, target: str,
                                                https_port: int, expected: str | None) -> None:
    assert redirect.location(host, target, https_port) == expected


def test_a_redirect_needs_https() -> None:
    with pytest.raises(SettingsError, match="'http_redirect'.*needs certfile and keyfile"):
        Settings(http_redirect="0.0.0.0:80")


def _plain(port: int, request: bytes) -> tuple[str, dict[str, str]]:
    with socket.create_connection(("127.0.0.1", port), 10) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head = data.split(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
    return head[0], dict(line.split(": ", 1) for line in head[1:])


def test_plain_http_is_redirected_to_the_same_url_on_https(https: Serve) -> None:
    status, headers = _plain(https.redirect, b"GET /environ?x=1 HTTP/1.1\r\n"
                             b"Host: 127.0.0.1:%d\r\n\r\n" % https.redirect)
    assert status == "HTTP/1.1 301 Moved Permanently"
    assert headers["Location"] == f"https://127.0.0.1:{https.port}/environ?x=1"
    followed = get(https.port, headers["Location"].split(str(https.port), 1)[1])
    assert json.loads(followed.body)["QUERY_STRING"] == "x=1"


def test_other_methods_get_308_and_no_host_gets_400(https: Serve) -> None:
    status, headers = _plain(https.redirect, b"POST /form HTTP/1.1\r\nHost: example.com\r\n"
                             b"Content-Length: 0\r\n\r\n")
    assert (status, headers["Location"]) == ("HTTP/1.1 308 Permanent Redirect",
                                             f"https://example.com:{https.port}/form")
    assert _plain(https.redirect, b"GET / HTTP/1.0\r\n\r\n")[0].startswith("HTTP/1.1 400")


def test_the_redirect_is_a_watcher_of_its_own(https: Serve) -> None:
    [pid] = https.pids("http-redirect")
    assert "circus_wsgi.redirect" in " ".join(psutil.Process(pid).cmdline())
    assert f"redirecting http://127.0.0.1:{https.redirect}/ to https, port {https.port}" \
        in https.output()

"""A Flask application: ``circus-wsgi serve examples.flask_app:app``.

It exercises what a real site needs from the gateway, and the tests run it
under circus-wsgi and gunicorn alike: query strings, unicode and
percent-encoded paths, cookies, redirects, forms, multipart uploads, chunked
request bodies, a streamed response, 204, 304 and a failing view.
"""

from __future__ import annotations

import functools
import hashlib

from flask import Flask, Response, jsonify, make_response, redirect, request

app = Flask(__name__)

BLOCK = b"0123456789abcdef" * 4096  # 64 KiB


@app.get("/")
def index():
    return "Hello from Flask\n"


@app.get("/query")
def query():
    return jsonify(args=request.args.to_dict(flat=False), query=request.query_string.decode())


@app.get("/path/<path:rest>")
def path(rest: str):
    return jsonify(rest=rest, path=request.path, script_root=request.script_root)


@app.get("/cookies")
def cookies():
    return jsonify(request.cookies)


@app.get("/cookies/set")
def set_cookies():
    response = redirect("/cookies")
    for name, value in request.args.items():
        response.set_cookie(name, value)
    return response


@app.get("/redirect/<int:times>")
def redirects(times: int):
    return redirect(f"/redirect/{times - 1}" if times > 1 else "/")


@app.post("/form")
def form():
    return jsonify(form=request.form.to_dict(flat=False))


@app.post("/upload")
def upload():
    files = {}
    for name, storage in request.files.items():
        digest, size = hashlib.sha256(), 0
        for block in iter(functools.partial(storage.stream.read, 65536), b""):
            digest.update(block)
            size += len(block)
        files[name] = {"filename": storage.filename, "size": size,
                       "sha256": digest.hexdigest()}
    return jsonify(files=files, form=request.form.to_dict())


@app.post("/echo")
def echo():
    data = request.get_data()
    return jsonify(size=len(data), sha256=hashlib.sha256(data).hexdigest(),
                   content_type=request.content_type)


@app.get("/stream/<int:megabytes>")
def stream(megabytes: int):
    def generate():
        for _ in range(megabytes * 16):
            yield BLOCK
    return Response(generate(), mimetype="application/octet-stream")


@app.get("/nothing")
def nothing():
    return "", 204


@app.get("/etag")
def etag():
    response = make_response("a body worth caching\n")
    response.set_etag("v1")
    return response.make_conditional(request)


@app.get("/unicode")
def unicode():
    return "h\u00e9llo \u2603\n"


@app.get("/fail")
def fail():
    raise RuntimeError("a failing view")

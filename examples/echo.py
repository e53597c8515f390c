"""A WSGI app that shows what it was given: GET returns the environ as JSON,
POST echoes the body back, streaming it through in 64 KiB pieces."""

import json


def app(environ, start_response):
    if environ["REQUEST_METHOD"] == "POST":
        length = int(environ.get("CONTENT_LENGTH") or 0)
        start_response("200 OK", [("Content-Type", "application/octet-stream"),
                                  ("Content-Length", str(length))])
        stream = environ["wsgi.input"]

        def body():
            while chunk := stream.read(65536):
                yield chunk
        return body()
    shown = {k: v for k, v in environ.items() if isinstance(v, (str, bool, int, tuple))}
    data = json.dumps(shown, sort_keys=True, default=list).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
    return [data]

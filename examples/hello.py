"""The smallest WSGI application (PEP 3333), for `cgigate fcgi --app examples.hello:app`."""


def app(environ, start_response):
    body = b"Hello, world!\n"
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]

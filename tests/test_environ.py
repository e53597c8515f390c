"""RFC 3875 section 4.1 meta-variables from the one shared builder."""

import pytest

from cgigate.cgi.environ import header_variable, meta_variables, split_host, to_environb
from cgigate.front.request import Request


def make_request(headers=(), method="GET", target=b"/cgi-bin/x.sh/p/q?a=1", version="1.1",
                 client=("192.0.2.7", 40000), server=("127.0.0.1", 8080), authority=None):
    path, _, query = target.partition(b"?")
    return Request(method=method, target=target, path=path, query=query, version=version,
                   headers=[(k.lower(), v) for k, v in headers], keep_alive=True, client=client,
                   server=server, request_id="r1", authority=authority)


def build(request, **kw):
    args = dict(script_name="/cgi-bin/x.sh", path_info="/p/q", script_filename="/srv/cgi/x.sh",
                document_root="/srv/cgi", default_server_name="fallback")
    args.update(kw)
    return meta_variables(request, **args)


def test_required_variables():
    env = build(make_request([(b"Host", b"example.com:8080"), (b"User-Agent", b"t/1")]))
    assert env["GATEWAY_INTERFACE"] == "CGI/1.1"
    assert env["REQUEST_METHOD"] == "GET"
    assert env["SCRIPT_NAME"] == "/cgi-bin/x.sh"
    assert env["PATH_INFO"] == "/p/q"
    assert env["PATH_TRANSLATED"] == "/srv/cgi/p/q"
    assert env["QUERY_STRING"] == "a=1"
    assert env["REQUEST_URI"] == "/cgi-bin/x.sh/p/q?a=1"
    assert env["SERVER_NAME"] == "example.com"
    assert env["SERVER_PORT"] == "8080"
    assert env["SERVER_PROTOCOL"] == "HTTP/1.1"
    assert env["SERVER_SOFTWARE"].startswith("cgigate/")
    assert env["REMOTE_ADDR"] == env["REMOTE_HOST"] == "192.0.2.7"
    assert env["REMOTE_PORT"] == "40000"
    assert env["SCRIPT_FILENAME"] == "/srv/cgi/x.sh"
    assert env["DOCUMENT_ROOT"] == "/srv/cgi"
    assert env["HTTP_USER_AGENT"] == "t/1"
    for absent in ("CONTENT_LENGTH", "CONTENT_TYPE", "AUTH_TYPE", "REMOTE_USER", "HTTPS"):
        assert absent not in env


def test_no_path_info_means_no_path_translated():
    env = build(make_request([(b"Host", b"h")], target=b"/cgi-bin/x.sh"), path_info="")
    assert "PATH_INFO" not in env and "PATH_TRANSLATED" not in env
    assert env["QUERY_STRING"] == ""


def test_httpoxy_and_content_headers_are_not_http_variables():
    env = build(make_request([(b"Host", b"h"), (b"Proxy", b"http://evil:1"),
                              (b"Content-Type", b"text/plain"), (b"Content-Length", b"0")]))
    assert "HTTP_PROXY" not in env
    assert "HTTP_CONTENT_TYPE" not in env and "HTTP_CONTENT_LENGTH" not in env
    assert env["CONTENT_TYPE"] == "text/plain"


def test_underscore_names_cannot_pose_as_dashed_ones():
    env = build(make_request([(b"Host", b"h"), (b"X-Forwarded-For", b"1.1.1.1"),
                              (b"X_Forwarded_For", b"6.6.6.6"), (b"X.Dot", b"1")]))
    assert env["HTTP_X_FORWARDED_FOR"] == "1.1.1.1"
    assert not any(k.startswith("HTTP_X_DOT") for k in env)


def test_repeated_headers_are_joined():
    env = build(make_request([(b"Host", b"h"), (b"Accept", b"a"), (b"Accept", b"b"),
                              (b"Cookie", b"x=1"), (b"Cookie", b"y=2")]))
    assert env["HTTP_ACCEPT"] == "a, b"
    assert env["HTTP_COOKIE"] == "x=1; y=2"


def test_authorization_only_when_allowed():
    request = make_request([(b"Host", b"h"), (b"Authorization", b"Basic dTpw")])
    assert "HTTP_AUTHORIZATION" not in build(request)
    assert build(request, pass_authorization=True)["HTTP_AUTHORIZATION"] == "Basic dTpw"


def test_bytes_pass_through_exactly():
    raw = b"caf\xc3\xa9 \xe9\x80"
    env = build(make_request([(b"Host", b"h"), (b"X-Raw", raw)]))
    assert to_environb(env)[b"HTTP_X_RAW"] == raw


def test_content_length_override_for_a_spooled_body():
    env = build(make_request([(b"Host", b"h"), (b"Transfer-Encoding", b"chunked")], method="POST"),
                content_length=1234)
    assert env["CONTENT_LENGTH"] == "1234"


def test_server_name_sources():
    assert build(make_request([]), )["SERVER_NAME"] == "fallback"
    assert build(make_request([(b"Host", b"bad host!")]))["SERVER_NAME"] == "fallback"
    assert build(make_request([(b"Host", b"[::1]:8080")]))["SERVER_NAME"] == "::1"
    # RFC 9112 section 3.2.2: an absolute-form target's authority wins over Host
    env = build(make_request([(b"Host", b"ignored.example")], authority=b"example.org"))
    assert env["SERVER_NAME"] == "example.org"


def test_unix_socket_client():
    env = build(make_request([(b"Host", b"h")], client=None, server="/run/c.sock"))
    assert env["REMOTE_ADDR"] == "unix:" and "REMOTE_PORT" not in env
    assert env["SERVER_PORT"] == "80"


def test_remote_user_when_authenticated():
    env = build(make_request([(b"Host", b"h")]), remote_user="ann", auth_type="Basic")
    assert env["REMOTE_USER"] == "ann" and env["AUTH_TYPE"] == "Basic"


@pytest.mark.parametrize("name,variable", [
    (b"user-agent", "HTTP_USER_AGENT"), (b"x-a-b", "HTTP_X_A_B"), (b"x_a", None), (b"x.a", None),
    (b"x=a", None)])
def test_header_variable(name, variable):
    assert header_variable(name) == variable


@pytest.mark.parametrize("value,parsed", [
    (b"example.com", ("example.com", "")), (b"Example.COM:81", ("example.com", "81")),
    (b"[::1]:8080", ("::1", "8080")), (b"example.com:", ("example.com", "")),
    (b"a b", None), (b"", None), (b"x/y", None)])
def test_split_host(value, parsed):
    assert split_host(value) == parsed


def test_server_name_falls_back_to_the_bound_address():
    env = build(make_request([], server=("10.1.2.3", 8080)), default_server_name="")
    assert env["SERVER_NAME"] == "10.1.2.3"
    assert build(make_request([], server="/run/c.sock"), default_server_name="")["SERVER_NAME"] == "localhost"

"""Classic CGI end to end: the real daemon, real child processes, real sockets."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import requests

from conftest import SAMPLE_CGI_BIN, children_of, raw_request, require_program, wait_gone


def read_pids(path, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(path) as f:
                text = f.read()
            if text.endswith("\n"):
                return [int(p) for p in text.split()]
        except FileNotFoundError:
            pass
        time.sleep(0.02)
    raise AssertionError(f"script never wrote {path}")


# --- meta-variables and the environment ---

def test_meta_variables_end_to_end(daemon):
    d = daemon("--cgi-dir", SAMPLE_CGI_BIN, env={"CGIGATE_TEST_SECRET": "do-not-leak"})
    r = requests.get(f"{d.url}/cgi-bin/env.py/a%20b/%C3%A9?x=1&y=%20",
                     headers={"Proxy": "http://evil.example:1", "X-Custom": "v1",
                              "Authorization": "Basic dTpw"})
    assert r.status_code == 200
    seen = r.json()
    env = seen["environ"]
    assert env["GATEWAY_INTERFACE"] == "CGI/1.1"
    assert env["REQUEST_METHOD"] == "GET"
    assert env["SCRIPT_NAME"] == "/cgi-bin/env.py"
    assert env["PATH_INFO"] == "/a b/\xc3\xa9"        # decoded, bytes as latin-1
    assert env["QUERY_STRING"] == "x=1&y=%20"          # raw
    assert env["REQUEST_URI"] == "/cgi-bin/env.py/a%20b/%C3%A9?x=1&y=%20"
    assert env["SERVER_PORT"] == str(d.port)
    assert env["SERVER_NAME"] == "127.0.0.1"
    assert env["SERVER_PROTOCOL"] == "HTTP/1.1"
    assert env["REMOTE_ADDR"] == "127.0.0.1" and env["REMOTE_PORT"].isdigit()
    assert env["SCRIPT_FILENAME"] == os.path.join(os.path.realpath(SAMPLE_CGI_BIN), "env.py")
    assert env["HTTP_X_CUSTOM"] == "v1"
    assert "HTTP_PROXY" not in env
    assert "HTTP_AUTHORIZATION" not in env
    assert "CGIGATE_TEST_SECRET" not in env
    assert "PATH" in env
    assert seen["cwd"] == os.path.realpath(SAMPLE_CGI_BIN)


def test_post_body_and_content_length(cgi):
    r = requests.post(f"{cgi.url}/cgi-bin/env.py", data=b"a=1&b=2",
                      headers={"Content-Type": "application/x-www-form-urlencoded"})
    env = r.json()["environ"]
    assert env["CONTENT_LENGTH"] == "7" and env["CONTENT_TYPE"] == "application/x-www-form-urlencoded"
    assert r.json()["stdin"] == "a=1&b=2"


@pytest.mark.parametrize("script", ["form.py", "form.pl"])
def test_form_echo(cgi, script):
    r = requests.post(f"{cgi.url}/cgi-bin/{script}", data={"name": "Ann & Bob", "colour": "red"})
    assert r.status_code == 200
    assert "Ann &amp; Bob" in r.text or "name=Ann & Bob" in r.text
    assert "red" in r.text


@pytest.mark.parametrize("script", ["hello.sh", "hello.py", "hello.pl"])
def test_hello_in_three_languages(cgi, script):
    r = requests.get(f"{cgi.url}/cgi-bin/{script}")
    assert r.status_code == 200 and r.text == "Hello, world!\n"
    assert r.headers["Content-Type"] == "text/plain"


def test_subdirectory_script_name_and_cwd(cgi):
    r = requests.get(f"{cgi.url}/t/sub/inner.sh/more/info")
    assert r.text == "inner /t/sub/inner.sh|/more/info\n"
    assert requests.get(f"{cgi.url}/t/pwd.sh").text.strip() == os.path.realpath(
        os.path.join(os.path.dirname(__file__), "cgi-bin"))


# --- RFC 3875 section 6 responses ---

def test_local_redirect_is_served_inside(cgi):
    r = requests.get(f"{cgi.url}/cgi-bin/redirect.sh?local", allow_redirects=False)
    assert r.status_code == 200 and r.text == "Hello, world!\n"


def test_client_redirect(cgi):
    r = requests.get(f"{cgi.url}/cgi-bin/redirect.sh", allow_redirects=False)
    assert r.status_code == 302
    assert r.headers["Location"].endswith("/cgi-bin/hello.sh")


def test_client_redirect_with_document(cgi):
    r = requests.get(f"{cgi.url}/cgi-bin/redirect.sh?doc", allow_redirects=False)
    assert r.status_code == 301 and "moved" in r.text
    assert r.headers["Location"].startswith("http://")


def test_local_redirect_loop_is_capped(cgi):
    r = requests.get(f"{cgi.url}/t/loop.sh")
    assert r.status_code == 500
    cgi.wait_for_log(r"-> 500: more than 5 local redirects")


def test_nph_passes_raw_output_and_closes(cgi):
    reply = raw_request(cgi, b"GET /cgi-bin/nph-hello.sh HTTP/1.1\r\nHost: x\r\n\r\n")
    assert reply == (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-NPH: yes\r\n\r\n"
                     b"Hello from an nph script\n")


def test_status_header(cgi):
    r = requests.get(f"{cgi.url}/t/status.sh?404%20Gone%20Away")
    assert r.status_code == 404 and r.reason == "Gone Away" and r.text == "body\n"


@pytest.mark.parametrize("status", ["600", "20", "099", "HTTP/1.1%20200%20OK"])
def test_bad_status_is_502(cgi, status):
    r = requests.get(f"{cgi.url}/t/status.sh?{status}")
    assert r.status_code == 502
    cgi.wait_for_log(r"rid=\S+ GET \S+ -> 502: script=\S+status.sh bad Status")


def test_bare_lf_headers(cgi):
    r = requests.get(f"{cgi.url}/t/lf_only.sh")
    assert r.status_code == 200 and r.headers["X-Style"] == "bare-lf" and r.text == "lf body\n"


def test_hop_by_hop_headers_from_a_script_are_dropped(cgi):
    r = requests.get(f"{cgi.url}/t/hop.sh")
    assert r.status_code == 200 and r.text == "plain body\n" and r.headers["X-Kept"] == "yes"
    cgi.wait_for_log(r"hop-by-hop response headers dropped: Connection, Transfer-Encoding")


def test_204_body_is_dropped(cgi):
    reply = raw_request(cgi, b"GET /t/nocontent.sh HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 204 ")
    assert b"must not be sent" not in reply


def test_script_content_length_longer_than_output_closes(cgi):
    sock = cgi.connect()
    sock.sendall(b"GET /t/short_length.sh HTTP/1.1\r\nHost: x\r\n\r\n")
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    sock.close()
    assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"only this\n")
    cgi.wait_for_log(r"ended 90 bytes short of its Content-Length")


def test_script_content_length_shorter_than_output_keeps_framing(cgi):
    sock = cgi.connect()
    sock.sendall(b"GET /t/long_length.sh HTTP/1.1\r\nHost: x\r\n\r\n"
                 b"GET /cgi-bin/hello.sh HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    sock.close()
    first, second = data.split(b"HTTP/1.1 200 OK", 2)[1:]
    assert first.endswith(b"\r\n\r\nhello")
    assert b"Hello, world!" in second


# --- broken scripts: 502 and a log line that says why ---

def test_exit_nonzero_without_output(cgi):
    r = requests.get(f"{cgi.url}/t/exit1.sh")
    assert r.status_code == 502
    line = cgi.wait_for_log(r"rid=(\S+) GET /t/exit1.sh -> 502: script=\S+/exit1.sh end of script output before "
                            r"headers.*exit status 1")
    rid = line.group(1)
    cgi.wait_for_log(rf"rid={rid} script=\S+/exit1.sh stderr: about to fail")
    cgi.wait_for_log(rf'"GET /t/exit1.sh HTTP/1.1" 502 .* rid={rid}', access=True)


def test_output_without_headers(cgi):
    assert requests.get(f"{cgi.url}/t/noheaders.sh").status_code == 502
    cgi.wait_for_log(r"noheaders.sh response header line without a colon")


def test_missing_shebang(cgi):
    assert requests.get(f"{cgi.url}/t/noshebang.cgi").status_code == 502
    cgi.wait_for_log(r"cannot execute \S+noshebang.cgi: Exec format error")


def test_failure_after_output_is_logged(cgi):
    r = requests.get(f"{cgi.url}/t/crash_after.sh")
    assert r.status_code == 200 and r.text == "partial\n"
    cgi.wait_for_log(r"script=\S+crash_after.sh exit status 3")


def test_stderr_goes_to_the_error_log(cgi):
    assert requests.get(f"{cgi.url}/t/stderr.sh").text == "ok\n"
    cgi.wait_for_log(r"rid=\S+ script=\S+/stderr.sh stderr: first complaint")
    cgi.wait_for_log(r"rid=\S+ script=\S+/stderr.sh stderr: second complaint")


def test_lots_of_stderr_before_stdout_does_not_deadlock(cgi):
    r = requests.get(f"{cgi.url}/t/bigstderr.py", timeout=20)
    assert r.text == "survived\n"


def test_output_before_reading_a_large_body_does_not_deadlock(cgi):
    body = os.urandom(8 * 1024 * 1024)
    r = requests.post(f"{cgi.url}/t/early_output.py", data=body, timeout=60)
    assert r.status_code == 200
    assert r.text.endswith(f"read {len(body)} sha256 {hashlib.sha256(body).hexdigest()}\n")


# --- lookup and security ---

@pytest.mark.parametrize("target,statuses", [
    (b"/cgi-bin/../../bin/sh", {400}),
    (b"/cgi-bin/%2e%2e/%2e%2e/bin/sh", {400}),
    (b"/cgi-bin/..%2f..%2fbin/sh", {404}),
    (b"/cgi-bin/%%32%65%%32%65/bin/sh", {400}),
    (b"/cgi-bin/hello.sh%00.txt", {400}),
    (b"/cgi-bin/hello.sh%0a", {400}),
    (b"/cgi-bin/", {404}),
    (b"/cgi-bin", {404}),
    (b"/cgi-bin/.hidden", {404}),
    (b"/etc/passwd", {404}),
    (b"/t/sub", {403}),
    (b"/t/readme.txt", {403}),
])
def test_hostile_paths_never_run(cgi, target, statuses):
    reply = raw_request(cgi, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    status = int(reply.split(b" ", 2)[1])
    assert status in statuses, reply[:200]


def test_symlink_out_of_the_directory_is_refused(daemon, tmp_path):
    marker = tmp_path / "ran"
    outside = tmp_path / "outside.sh"
    outside.write_text(f"#!/bin/sh\ntouch {marker}\nprintf 'Content-Type: text/plain\\r\\n\\r\\nx'\n")
    outside.chmod(0o755)
    cgi_dir = tmp_path / "cgi"
    cgi_dir.mkdir()
    os.symlink(outside, cgi_dir / "evil.sh")
    os.symlink(tmp_path, cgi_dir / "up")
    d = daemon("--cgi-dir", str(cgi_dir))
    assert requests.get(f"{d.url}/cgi-bin/evil.sh").status_code == 403
    assert requests.get(f"{d.url}/cgi-bin/up/outside.sh").status_code == 403
    assert not marker.exists()
    d.wait_for_log(r"evil.sh resolves to \S+outside.sh, outside the CGI directory")


def test_interpreter_mapping_runs_non_executable_files(cgi):
    r = requests.get(f"{cgi.url}/t/plain.py")
    assert r.status_code == 200 and r.text == "ran through the interpreter mapping\n"


def test_isindex_query_becomes_argv(cgi):
    assert requests.get(f"{cgi.url}/cgi-bin/search.sh?one+two%20words").text == "2\n[one]\n[two words]\n"
    assert requests.get(f"{cgi.url}/cgi-bin/search.sh?a=b").text == "0\n"
    # no option injection (CVE-2012-1823), no shell
    assert requests.get(f"{cgi.url}/cgi-bin/search.sh?-s+x").text == "0\n"
    assert requests.get(f"{cgi.url}/cgi-bin/search.sh?%24(id)+%60id%60+;id").text == \
        "3\n[$(id)]\n[`id`]\n[;id]\n"


def test_shellshock_payload_is_inert(daemon, tmp_path):
    bash = require_program("bash")
    marker = tmp_path / "pwned"
    cgi_dir = tmp_path / "cgi"
    cgi_dir.mkdir()
    script = cgi_dir / "b.sh"
    script.write_text(f"#!{bash}\nprintf 'Content-Type: text/plain\\r\\n\\r\\n%s' \"$HTTP_USER_AGENT\"\n")
    script.chmod(0o755)
    d = daemon("--cgi-dir", str(cgi_dir))
    payload = f"() {{ :;}}; /usr/bin/touch {marker}"
    r = requests.get(f"{d.url}/cgi-bin/b.sh", headers={"User-Agent": payload})
    assert r.text == payload and not marker.exists()


def test_resource_limits(daemon, tmp_path):
    conf = tmp_path / "c.toml"
    conf.write_text(f"[cgi]\nlimit_open_files = 37\nlimit_address_space = \"512M\"\nlimit_cpu_seconds = 7\n"
                    f"[[route]]\nprefix = \"/t/\"\ncgi_dir = \"{os.path.dirname(__file__)}/cgi-bin\"\n")
    d = daemon("-c", str(conf))
    assert requests.get(f"{d.url}/t/rlimits.sh").text == "nofile=37 as=524288 cpu=7\n"


# --- timeouts, disconnects, process groups, zombies ---

def test_timeout_kills_the_whole_process_group(cgi, tmp_path):
    pidfile = tmp_path / "pids"
    r = requests.get(f"{cgi.url}/t/fast/sleep.py?pidfile={pidfile}", timeout=30)
    assert r.status_code == 504
    script_pid, grandchild_pid = read_pids(pidfile)
    wait_gone([script_pid, grandchild_pid])
    cgi.wait_for_log(r"-> 504: script=\S+sleep.py ran over its 1s timeout; process group killed")


def test_sigterm_ignored_escalates_to_sigkill(cgi, tmp_path):
    pidfile = tmp_path / "pids"
    r = requests.get(f"{cgi.url}/t/fast/sleep.py?ignore-term=1&pidfile={pidfile}", timeout=30)
    assert r.status_code == 504
    wait_gone(read_pids(pidfile))
    cgi.wait_for_log(r"script=\S+sleep.py killed by SIGKILL")


def test_timeout_after_headers_cuts_the_response(cgi, tmp_path):
    pidfile = tmp_path / "pids"
    sock = cgi.connect()
    sock.sendall(f"GET /t/fast/sleep.py?headers=1&pidfile={pidfile} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    sock.close()
    assert data.startswith(b"HTTP/1.1 200 OK") and b"started" in data
    assert not data.endswith(b"0\r\n\r\n")   # no final chunk: the client can tell it was cut
    wait_gone(read_pids(pidfile))


def test_client_disconnect_kills_the_script(cgi, tmp_path):
    pidfile = tmp_path / "pids"
    sock = cgi.connect()
    sock.sendall(f"GET /t/sleep.py?pidfile={pidfile} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    pids = read_pids(pidfile)
    sock.close()
    wait_gone(pids)
    cgi.wait_for_log(r"script=\S+sleep.py client went away; process group killed")
    cgi.wait_no_children()
    assert requests.get(f"{cgi.url}/cgi-bin/hello.sh").status_code == 200


def test_background_process_holding_stdout_does_not_hang_the_response(cgi):
    r = requests.get(f"{cgi.url}/t/daemonize.sh", timeout=20)
    assert r.status_code == 200 and r.text == "parent done\n"
    cgi.wait_for_log(r"daemonize.sh exited but its stdout is still open")
    cgi.wait_no_children()


def test_no_zombies_after_many_requests(cgi):
    for _ in range(30):
        assert requests.get(f"{cgi.url}/cgi-bin/hello.sh").status_code == 200
        requests.get(f"{cgi.url}/t/exit1.sh")
    cgi.wait_no_children()
    assert not [c for c in children_of(cgi.pid) if c[1] == "Z"]


# --- the concurrency limit and its queue ---

def test_full_queue_gets_503(daemon, tmp_path):
    conf = tmp_path / "c.toml"
    conf.write_text(f"[cgi]\nmax_children = 1\nqueue_size = 1\n"
                    f"[[route]]\nprefix = \"/t/\"\ncgi_dir = \"{os.path.dirname(__file__)}/cgi-bin\"\n")
    d = daemon("-c", str(conf))
    results = []

    def fetch():
        r = requests.get(f"{d.url}/t/wait.sh?1", timeout=30)
        results.append((r.status_code, r.headers.get("Retry-After")))

    threads = [threading.Thread(target=fetch) for _ in range(4)]
    for t in threads:
        t.start()
        time.sleep(0.1)
    for t in threads:
        t.join()
    statuses = sorted(s for s, _ in results)
    assert statuses.count(200) == 2, results      # one running, one queued
    assert statuses.count(503) == 2, results
    assert all(retry == "1" for s, retry in results if s == 503)
    d.wait_for_log(r"-> 503: 1 scripts running and 1 waiting")


def test_queue_wait_is_bounded(daemon, tmp_path):
    conf = tmp_path / "c.toml"
    conf.write_text(f"[cgi]\nmax_children = 1\nqueue_timeout = 0.5\n"
                    f"[[route]]\nprefix = \"/t/\"\ncgi_dir = \"{os.path.dirname(__file__)}/cgi-bin\"\n")
    d = daemon("-c", str(conf))
    first = threading.Thread(target=requests.get, args=(f"{d.url}/t/wait.sh?2",), kwargs={"timeout": 30})
    first.start()
    time.sleep(0.3)
    assert requests.get(f"{d.url}/cgi-bin/hello.sh").status_code == 404   # not routed: no slot needed
    assert requests.get(f"{d.url}/t/pwd.sh", timeout=30).status_code == 503
    first.join()
    d.wait_for_log(r"waited 0.5s for a free CGI slot")


def test_sigterm_mid_request_finishes_it(cgi):
    results = []
    t = threading.Thread(target=lambda: results.append(requests.get(f"{cgi.url}/t/wait.sh?1", timeout=30)))
    t.start()
    cgi.wait_for_log(r"listening")
    time.sleep(0.3)
    os.kill(cgi.pid, signal.SIGTERM)
    t.join()
    assert results[0].status_code == 200 and results[0].text == "waited 1\n"
    assert cgi.proc.wait(15) == 0
    assert re.search(r"SIGTERM: stopped accepting", cgi.error_text())


def test_default_config_serves_the_samples(daemon):
    d = daemon("-c", "conf/cgigate.toml", "--bind", "127.0.0.1:0")
    assert requests.get(f"{d.url}/cgi-bin/hello.pl").text == "Hello, world!\n"
    assert requests.get(f"{d.url}/cgi-bin/hello.py").text == "Hello, world!\n"
    assert sys.executable  # the venv's interpreter ran this suite


def test_unix_socket_bind(daemon, tmp_path):
    import socket as socketlib
    path = tmp_path / "cgigate.sock"
    path.touch()
    os.unlink(path)
    stale = socketlib.socket(socketlib.AF_UNIX)   # a socket file left by a dead daemon
    stale.bind(str(path))
    stale.close()
    d = daemon("--cgi-dir", SAMPLE_CGI_BIN, "--bind", f"unix:{path}")
    assert oct(os.stat(path).st_mode & 0o777) == "0o660"
    sock = socketlib.socket(socketlib.AF_UNIX)
    sock.settimeout(10)
    sock.connect(str(path))
    sock.sendall(b"GET /cgi-bin/env.py HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    sock.close()
    assert data.startswith(b"HTTP/1.1 200 OK")
    assert b'"REMOTE_ADDR": "unix:"' in data
    assert d.stop() == 0
    assert not path.exists()


def test_sigint_stops_like_sigterm(daemon):
    d = daemon("--cgi-dir", SAMPLE_CGI_BIN)
    assert requests.get(f"{d.url}/cgi-bin/hello.sh").status_code == 200
    d.proc.send_signal(signal.SIGINT)
    assert d.proc.wait(15) == 0
    assert "SIGINT: stopped accepting" in d.error_text()


def test_scripts_inherit_only_their_three_streams(cgi):
    # keep a few client connections open so that there are sockets to leak
    extra = [cgi.connect() for _ in range(3)]
    try:
        for r in (requests.get(f"{cgi.url}/t/fds.py"), requests.post(f"{cgi.url}/t/fds.py", data=b"body")):
            fds = dict(line.split(" ", 1) for line in r.text.splitlines())
            assert sorted(fds) == ["0", "1", "2"], fds
            assert fds["1"].startswith("pipe:") and fds["2"].startswith("pipe:")
    finally:
        for sock in extra:
            sock.close()


def test_sigpipe_is_default_in_scripts(cgi):
    r = requests.get(f"{cgi.url}/t/sigpipe.sh")
    assert r.text.strip() == "SIGPIPE default"


# --- more of the research edge cases (shared/research/gateways.md section 3) ---

def test_script_that_prints_nothing_and_exits_0(cgi):
    assert requests.get(f"{cgi.url}/t/silent.sh").status_code == 502
    cgi.wait_for_log(r"silent.sh end of script output before headers \(the script printed nothing\); "
                     r"exit status 0")


def test_get_with_a_body_and_an_empty_post(cgi):
    r = requests.request("GET", f"{cgi.url}/cgi-bin/env.py", data=b"abc")
    assert r.json()["stdin"] == "abc" and r.json()["environ"]["CONTENT_LENGTH"] == "3"
    r = requests.post(f"{cgi.url}/cgi-bin/env.py", data=b"")
    seen = r.json()
    assert seen["environ"]["CONTENT_LENGTH"] == "0" and seen["stdin_length"] == 0


@pytest.mark.parametrize("method", ["OPTIONS", "PUT", "DELETE", "PATCH", "PROPFIND"])
def test_other_methods_reach_the_script(cgi, method):
    r = requests.request(method, f"{cgi.url}/cgi-bin/env.py")
    assert r.status_code == 200 and r.json()["environ"]["REQUEST_METHOD"] == method


def test_collapsed_paths_run_the_same_script(cgi):
    for target in (b"//cgi-bin//hello.sh", b"/./cgi-bin/./hello.sh", b"/cgi-bin/sub/../hello.sh"):
        reply = raw_request(cgi, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 200") and b"Hello, world!\n" in reply, reply[:300]


def test_header_name_collisions_and_odd_names(cgi):
    reply = raw_request(cgi, b"GET /cgi-bin/env.py HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                             b"X-Forwarded-For: 1.1.1.1\r\nX_Forwarded_For: 6.6.6.6\r\nX.Dot: 1\r\n"
                             b"X-Utf8: caf\xc3\xa9\r\n\r\n")
    body = reply.split(b"\r\n\r\n", 1)[1]
    assert b'"HTTP_X_FORWARDED_FOR": "1.1.1.1"' in body
    assert b"6.6.6.6" not in body and b"X_DOT" not in body
    assert '"HTTP_X_UTF8": "caf\\u00c3\\u00a9"'.encode() in body   # the raw bytes, as latin-1


def test_script_cannot_read_past_content_length(cgi):
    # the bytes after a Content-Length body are the next request, never more body
    sock = cgi.connect()
    sock.sendall(b"POST /cgi-bin/env.py HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
                 b"GET /cgi-bin/hello.sh HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    sock.close()
    assert data.count(b"HTTP/1.1 200 OK") == 2
    assert b'"stdin": "hello"' in data and b"Hello, world!" in data


def test_default_config_serves_cgi_app_and_fastcgi_side_by_side(daemon):
    flup = subprocess.Popen([sys.executable, os.path.join(os.path.dirname(SAMPLE_CGI_BIN), "examples",
                                                          "flup_hello.py"), "/tmp/cgigate-demo-flup.sock"])
    try:
        deadline = time.monotonic() + 15
        while not os.path.exists("/tmp/cgigate-demo-flup.sock") and time.monotonic() < deadline:
            time.sleep(0.05)
        d = daemon("-c", "conf/cgigate.toml", "--bind", "127.0.0.1:0")
        assert requests.get(f"{d.url}/cgi-bin/hello.sh").text == "Hello, world!\n"
        assert requests.get(f"{d.url}/app/").text == "Hello, world!\n"
        assert requests.get(f"{d.url}/flup/").text == "Hello, world!\n"
    finally:
        flup.kill()
        flup.wait(10)

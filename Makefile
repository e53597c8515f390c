# cgigate: the two set-up commands are `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test demo bench bench-quick check-config clean venv

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit("cgigate needs Python 3.11+, found " + sys.version.split()[0]) if sys.version_info < (3, 11) else None'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,demo]'
	touch $(STAMP)

# The demo: CGI scripts under /cgi-bin/, a WSGI app on cgigate's own FastCGI
# workers under /app/, and flup as an external FastCGI responder under /flup/.
run: $(STAMP)
	@$(PY) examples/flup_hello.py /tmp/cgigate-demo-flup.sock & flup=$$!; \
	trap 'kill -9 $$flup 2>/dev/null; rm -f /tmp/cgigate-demo-flup.sock' EXIT INT TERM; \
	$(VENV)/bin/cgigate serve -c conf/cgigate.toml

check-config: $(STAMP)
	$(VENV)/bin/cgigate check-config -c conf/cgigate.toml

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# The teaching demo: CGI against FastCGI on this machine, about a minute;
# the report lands in ./demo-report/.  DEMO_ARGS="--against nginx-fcgiwrap,flup".
demo: $(STAMP)
	$(VENV)/bin/cgigate demo $(DEMO_ARGS)

# The three benchmarks, against their peers (nginx + fcgiwrap, http.server, a
# spawn loop; gunicorn, flup; behind nginx: fcgiwrap, flup threaded and
# forking): about 14 minutes.  bench-quick: one short run of each.
bench: $(STAMP)
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) benchmarks/cgi_bench.py $(BENCH_ARGS)
	$(PY) benchmarks/wsgi_bench.py --no-profile $(BENCH_ARGS)
	$(PY) benchmarks/nginx_bench.py $(BENCH_ARGS)

bench-quick: $(STAMP)
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) benchmarks/cgi_bench.py --quick $(BENCH_ARGS)
	$(PY) benchmarks/wsgi_bench.py --quick --no-profile $(BENCH_ARGS)
	$(PY) benchmarks/nginx_bench.py --quick $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

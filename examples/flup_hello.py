"""flup's threaded FastCGI server with examples/hello.py: the external
FastCGI responder that `make run` puts under /flup/.

    python examples/flup_hello.py /tmp/cgigate-demo-flup.sock
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flup.server.fcgi import WSGIServer  # noqa: E402

from examples.hello import app  # noqa: E402

if __name__ == "__main__":
    path = sys.argv[1] if len(sys.argv) > 1 else "/tmp/cgigate-demo-flup.sock"
    if os.path.exists(path):
        os.unlink(path)
    WSGIServer(app, bindAddress=path, debug=False).run()

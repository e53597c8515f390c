#!/usr/bin/env python3
"""A form handler: GET shows a form, POST echoes the fields it was sent."""
import html
import os
import sys
from urllib.parse import parse_qsl

method = os.environ.get("REQUEST_METHOD", "GET")
out = sys.stdout
out.write("Content-Type: text/html; charset=utf-8\r\n\r\n")
out.write("<!doctype html><title>form</title>\n")
if method == "POST":
    length = int(os.environ.get("CONTENT_LENGTH") or 0)
    fields = parse_qsl(sys.stdin.read(length), keep_blank_values=True)
    out.write("<h1>You sent</h1><dl>\n")
    for name, value in fields:
        out.write(f"<dt>{html.escape(name)}</dt><dd>{html.escape(value)}</dd>\n")
    out.write("</dl>\n")
else:
    out.write('<form method="post"><input name="name"><input name="colour">'
              '<button>send</button></form>\n')

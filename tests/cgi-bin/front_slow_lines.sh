#!/bin/sh
# Streaming check for tests/test_http_front.py: a header, then one line every
# 0.3 s, five lines in all (no Content-Length, so the front must stream).
printf 'Content-Type: text/plain\r\n\r\n'
for i in 1 2 3 4 5; do
  printf 'line %s\n' "$i"
  [ "$i" = 5 ] || sleep 0.3
done

#!/bin/sh
# For tests/test_http_front.py: sleeps 1.5 s (or the number of seconds given
# as the query string, e.g. ?30), then answers 200 with a short text.
secs=${QUERY_STRING:-1.5}
case "$secs" in
  ''|*[!0-9.]*) secs=1.5 ;;
esac
sleep "$secs"
printf 'Content-Type: text/plain\r\n\r\nanswered after %s s\n' "$secs"

#!/bin/sh
# For tests/test_http_front.py: a script that ignores SIGTERM (its sleep
# inherits that), so only SIGKILL ends it.  Answers after 30 s, if ever.
trap '' TERM
sleep 30
printf 'Content-Type: text/plain\r\n\r\nstill here\n'

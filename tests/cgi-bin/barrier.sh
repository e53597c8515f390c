#!/bin/sh
# Leaves a marker in $HTTP_X_MARKERS, then waits (at most 10 s) until the
# query's number of markers are there: only requests running at the same
# time can all see each other.
touch "$HTTP_X_MARKERS/$$"
n=0
for _ in $(seq 100); do
  n=$(ls "$HTTP_X_MARKERS" | wc -l)
  [ "$n" -ge "${QUERY_STRING:-1}" ] && break
  sleep 0.1
done
printf 'Content-Type: text/plain\r\n\r\nseen=%s\n' "$n"

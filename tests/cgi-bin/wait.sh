#!/bin/sh
# Sleeps for the number of seconds given as the query (?1), then answers.
sleep "${1:-1}"
printf 'Content-Type: text/plain\r\n\r\nwaited %s\n' "${1:-1}"

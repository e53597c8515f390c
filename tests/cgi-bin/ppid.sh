#!/bin/sh
# Prints the pid of the process that started this script (the gateway's worker).
printf 'Content-Type: text/plain\r\n\r\n%s\n' "$PPID"

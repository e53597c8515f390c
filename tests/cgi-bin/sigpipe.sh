#!/bin/sh
# The daemon ignores SIGPIPE; a script must get the default disposition back.
printf 'Content-Type: text/plain\r\n\r\n'
ignored=$(awk '/^SigIgn/ {print $2}' /proc/$$/status)
if [ $(( 0x$ignored & 0x1000 )) -ne 0 ]; then echo "SIGPIPE ignored"; else echo "SIGPIPE default"; fi

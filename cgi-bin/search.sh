#!/bin/sh
# RFC 3875 section 4.4: a query with no '=' arrives as command-line words.
printf 'Content-Type: text/plain\r\n\r\n'
printf '%s\n' "$#"
for word in "$@"; do printf '[%s]\n' "$word"; done

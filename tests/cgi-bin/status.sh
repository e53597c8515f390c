#!/bin/sh
# Prints the Status line given as the query (URL-decoded by printf's %b of \x escapes is not needed).
printf 'Status: %s\r\nContent-Type: text/plain\r\n\r\nbody\n' "$(echo "$QUERY_STRING" | sed 's/%20/ /g')"

#!/bin/sh
# Leaves a background process holding stdout open, then exits.
printf 'Content-Type: text/plain\r\n\r\nparent done\n'
sleep 30 &
exit 0

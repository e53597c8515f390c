#!/bin/sh
printf 'Content-Type: text/plain\r\n\r\nnofile=%s as=%s cpu=%s\n' "$(ulimit -n)" "$(ulimit -v)" "$(ulimit -t)"

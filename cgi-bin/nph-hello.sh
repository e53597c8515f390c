#!/bin/sh
# A non-parsed-header script: it writes the whole HTTP response itself.
printf '%s 200 OK\r\nContent-Type: text/plain\r\nX-NPH: yes\r\n\r\nHello from an nph script\n' "${SERVER_PROTOCOL:-HTTP/1.0}"

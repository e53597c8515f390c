#!/bin/sh
# The smallest CGI program: a header block, a blank line, a body.
printf 'Content-Type: text/plain\r\n\r\nHello, world!\n'

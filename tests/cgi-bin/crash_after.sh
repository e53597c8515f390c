#!/bin/sh
printf 'Content-Type: text/plain\r\n\r\npartial\n'
exit 3

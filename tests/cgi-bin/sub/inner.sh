#!/bin/sh
printf 'Content-Type: text/plain\r\n\r\ninner %s|%s\n' "$SCRIPT_NAME" "$PATH_INFO"

#!/bin/sh
printf 'Status: 204 No Content\r\nContent-Type: text/plain\r\n\r\nthis body must not be sent\n'

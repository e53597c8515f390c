#!/bin/sh
printf 'Location: /t/loop.sh\r\n\r\n'

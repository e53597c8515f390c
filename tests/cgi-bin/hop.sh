#!/bin/sh
printf 'Content-Type: text/plain\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\nX-Kept: yes\r\n\r\nplain body\n'

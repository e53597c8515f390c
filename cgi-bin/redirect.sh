#!/bin/sh
# RFC 3875 section 6.2: ?local gives a local redirect (handled inside the
# server), ?doc a client redirect with a document, anything else a client redirect.
case "$QUERY_STRING" in
  local) printf 'Location: /cgi-bin/hello.sh\r\n\r\n' ;;
  doc)   printf 'Status: 301 Moved Permanently\r\nLocation: http://%s/cgi-bin/hello.sh\r\nContent-Type: text/html\r\n\r\n<a href="/cgi-bin/hello.sh">moved</a>\n' "$HTTP_HOST" ;;
  *)     printf 'Location: http://%s/cgi-bin/hello.sh\r\n\r\n' "$HTTP_HOST" ;;
esac

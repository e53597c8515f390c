#!/bin/sh
printf 'Content-Type: text/plain\nX-Style: bare-lf\n\nlf body\n'

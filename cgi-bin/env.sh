#!/bin/sh
# Prints the CGI meta-variables this script was given, one NAME=value per line.
printf 'Content-Type: text/plain\r\n\r\n'
env | sort

#!/usr/bin/env perl
print "Content-Type: text/plain\r\n\r\nHello, world!\n";

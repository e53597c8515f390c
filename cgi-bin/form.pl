#!/usr/bin/env perl
# A form handler in Perl: POST echoes the url-encoded fields back as text.
use strict;
use warnings;
my $body = '';
my $len = $ENV{CONTENT_LENGTH} || 0;
read(STDIN, $body, $len) if $len > 0;
print "Content-Type: text/plain\r\n\r\n";
for my $pair (split /&/, $body) {
    my ($k, $v) = split /=/, $pair, 2;
    $v = '' unless defined $v;
    for ($k, $v) { tr/+/ /; s/%([0-9A-Fa-f]{2})/chr(hex($1))/ge; }
    print "$k=$v\n";
}

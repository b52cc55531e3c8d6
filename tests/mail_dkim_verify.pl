#!/usr/bin/perl
# Verifies the DKIM signatures of the message on standard input with Perl's Mail::DKIM (Debian's
# libmail-dkim-perl), an implementation independent of pymta's; keys come from the DNS server at
# 127.0.0.1:PORT. Prints one line per signature ("RESULT DOMAIN ALGORITHM DETAIL") and the overall
# result last ("overall RESULT"). With "arc" after the port, the ARC chain is validated instead
# (Mail::DKIM::ARC::Verifier) and one line "arc RESULT DETAIL" is printed.
use strict;
use warnings;
use Mail::DKIM::Verifier;
use Mail::DKIM::ARC::Verifier;
use Net::DNS::Resolver;

my $port = shift or die "usage: $0 DNS-PORT [arc] < message\n";
my $mode = shift || "dkim";
my $res = Net::DNS::Resolver->new(nameservers => ['127.0.0.1'], port => $port, recurse => 1,
                                  udp_timeout => 5, tcp_timeout => 5, retry => 1);
Mail::DKIM::DNS::resolver($res);
my $dkim = $mode eq "arc" ? Mail::DKIM::ARC::Verifier->new() : Mail::DKIM::Verifier->new();
binmode STDIN;
while (my $line = <STDIN>) {
    $line =~ s/\r?\n\z/\r\n/;
    $dkim->PRINT($line);
}
$dkim->CLOSE;
if ($mode eq "arc") {
    printf "arc %s %s\n", $dkim->result, $dkim->result_detail;
    exit 0;
}
foreach my $sig ($dkim->signatures) {
    printf "%s %s %s %s\n", $sig->result, $sig->domain, $sig->algorithm, $sig->result_detail;
}
printf "overall %s\n", $dkim->result;

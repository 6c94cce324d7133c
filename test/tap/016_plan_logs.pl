# Copyright: the apikeys authors.
#
# Plans in the server log hold no token that apikeys made.  debug_print_plan
# (which any role, so a database's owner for every session, may turn on) and
# auto_explain with log_verbose write a statement's plan to the server log,
# constants included; PL/pgSQL's first five runs of a query in a session use
# a custom plan, in which its variables are constants.  create_key() and
# rotate() returned their new token through RETURN QUERY, so its plan held
# the token: as bytes (" 97 107 95 ...") in debug_print_plan's dump, as text
# in auto_explain's.  They now assign it.

use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use FindBin;
use lib "$FindBin::RealBin/../perl";    # test/perl: ApikeysTest
use ApikeysTest;

my $node = new_node('plan_logs', q{
log_min_messages = info
});
sql($node, 'postgres', 'CREATE EXTENSION apikeys');
sql($node, 'postgres', q{SELECT apikeys.set_plan('plan-owner', 'enterprise')});

# The token's text, and its bytes as a plan dump writes a constant's.
sub forms
{
	my ($token) = @_;
	return ($token, join(' ', map { ord } split //, $token));
}

# Tokens that create_key() and rotate() return to one session that logs
# every plan, $n of each (beyond the five custom plans).
sub tokens_made
{
	my ($settings, $n) = @_;
	my $out = sql($node, 'postgres', $settings . qq{
CREATE TEMP TABLE made AS
    SELECT k.key_id, k.token::text AS token FROM generate_series(1, $n) g,
           LATERAL apikeys.create_key('plan-owner', 'logged ' || g) k WHERE g > 0;
SELECT token FROM made;
SELECT r.token FROM made, LATERAL apikeys.rotate(made.key_id, 'plan-owner', '1 hour') r;
});
	return grep { /_/ } split /\n/, $out;
}

my %settings = (
	'debug_print_plan' => "SET debug_print_plan = on;\nSET client_min_messages = warning;\n",
	'auto_explain' => "LOAD 'auto_explain';\nSET auto_explain.log_min_duration = 0;\n"
	  . "SET auto_explain.log_nested_statements = on;\nSET auto_explain.log_verbose = on;\n"
	  . "SET client_min_messages = warning;\n",
);
for my $how (sort keys %settings)
{
	my $from = -s $node->logfile;
	my @tokens = tokens_made($settings{$how}, 7);
	is(scalar(@tokens), 14, "$how: 7 keys created and 7 rotated");
	my $log = log_since($node, $from);
	cmp_ok(length($log), '>', 10_000, "$how: the plans are in the log");
	# debug_print_plan's dump breaks a constant's bytes over lines.
	(my $flat = $log) =~ s/\s+/ /g;
	my @found;
	for my $token (@tokens)
	{
		my ($text, $bytes) = forms($token);
		push @found, $token if index($log, $text) >= 0 || index($flat, $bytes) >= 0;
	}
	is(scalar(@found), 0, "$how: no token is in the log, as text or as bytes")
	  or diag('found: ' . join(', ', map { substr($_, 0, 12) . '...' } @found));
}

$node->stop;
done_testing();

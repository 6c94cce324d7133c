# Copyright: the apikeys authors.
#
# A client flooding authenticate() with bad tokens cannot fill the server's
# disk through its log (library preloaded).  Every refusal raises 28000 to
# the client, but apikeys' emit_log_hook keeps exactly those reports out of
# the server log: the audit log has them already, aggregated.
#
#  1. 4,000 authenticate() calls, each its own statement, with malformed,
#     unknown and revoked tokens: the client gets 28000 for every one, the
#     server log gains no line naming them (no ERROR, no DETAIL, no
#     "API_KEY_"), and grows by less than 1 kB; the audit log's
#     verify_failed records count all 4,000 refusals.
#  2. Other errors still reach the log: a division by zero, a 28000 raised
#     by a PL/pgSQL function with authenticate()'s very message and detail
#     (only apikeys' own C function is silenced), and verify()'s 22023 for a
#     bad cost.
#  3. revoke_token()'s own errors are logged without the statement, which
#     holds the leaked token.
#
# The node logs no statements or connections, so that what the log gains is
# only what the refusals would write.  Run from the repository root (make
# prove_installcheck), with the helpers of test/perl/ApikeysTest.pm.

use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use FindBin;
use lib "$FindBin::RealBin/../perl";    # test/perl: ApikeysTest
use ApikeysTest;
use IPC::Run;

my $node = new_node('quiet', "log_statement = none\nlog_connections = off\nlog_disconnections = off\n"
	  . "log_min_duration_statement = -1\n");
$node->safe_psql('postgres', 'CREATE DATABASE ql');
sql($node, 'ql', 'CREATE EXTENSION apikeys');
sql($node, 'ql', q{SELECT apikeys.set_plan('flooded', 'enterprise')});
my ($revoked_id, $revoked) = new_key($node, 'ql', q{'flooded', 'revoked'});
sql($node, 'ql', qq{SELECT apikeys.revoke('$revoked_id', 'flooded')});
sql($node, 'ql', qq{CREATE TABLE bad (n int PRIMARY KEY, token text);
	INSERT INTO bad VALUES (1, 'garbage'),
	                       (2, 'ak_live_000000000000000000000000000000004YzvZp'),
	                       (3, '$revoked'),
	                       (4, upper('$revoked'))});
sql($node, 'ql', 'SELECT apikeys.flush()');

# 1. The flood: each call its own statement, so that each failure is reported
# as an uncaught error would be (psql goes on after errors).
my $script = $node->basedir . '/flood.sql';
open(my $fh, '>', $script) or die "cannot write $script: $!";
for my $i (1 .. 4000)
{
	print $fh 'SELECT apikeys.authenticate(token) FROM bad WHERE n = ' . (1 + $i % 4) . ";\n";
}
close($fh);
my $from = -s $node->logfile;
my ($out, $err) = ('', '');
IPC::Run::run([ 'psql', '-X', '-q', '-d', $node->connstr('ql'), '-f', $script ],
	'>', \$out, '2>', \$err);
my @refused = ($err =~ /ERROR:  API_KEY_(?:INVALID|REVOKED)/g);
is(scalar(@refused), 4000, '1: all 4,000 authenticate() calls were refused to the client (28000)');
sql($node, 'ql', 'SELECT apikeys.flush()');
my $gained = (-s $node->logfile) - $from;
my @named = log_lines($node, $from, qr/ERROR|DETAIL|API_KEY_|not accepted/);
is(scalar(@named), 0, '1: the server log names none of the refusals') or diag(join("\n", @named));
cmp_ok($gained, '<', 1024, "1: the server log grew by less than 1 kB ($gained bytes)");
is(sql($node, 'ql', q{SELECT sum((details->>'count')::bigint) FROM apikeys.audit_log
                       WHERE event = 'verify_failed'}),
	'4000', '1: the audit log counts all 4,000 refusals');

# 2. Other errors are still logged.
$from = -s $node->logfile;
sql_error($node, 'ql', 'SELECT 1/0');
sql($node, 'ql', q{CREATE FUNCTION refuse() RETURNS void LANGUAGE plpgsql AS $$
	BEGIN RAISE EXCEPTION 'API_KEY_INVALID' USING ERRCODE = '28000',
	      DETAIL = 'The API key was not accepted.'; END $$});
sql_error($node, 'ql', 'SELECT refuse()');
sql_error($node, 'ql', q{SELECT apikeys.verify('garbage', '{}', NULL, -1)});
my $log = log_since($node, $from);
like($log, qr/ERROR:  division by zero/, '2: a division by zero is logged');
like($log, qr/ERROR:  API_KEY_INVALID/, "2: a PL/pgSQL function's own 28000 is logged");
like($log, qr/ERROR:  cost must be between 0 and 1000000/, "2: verify's 22023 is logged");

# 3. revoke_token() takes a leaked token pasted into the statement: its own
# errors are logged without the statement (before, "STATEMENT:" quoted it).
my ($leak_id, $leak) = new_key($node, 'ql', q{'flooded', 'leaked'});
$from = -s $node->logfile;
my (undef, $leak_err) = sql_error($node, 'ql', qq{SELECT apikeys.revoke_token('$leak', repeat('x', 1001))});
like($leak_err, qr/22023/, '3: revoke_token with a reason too long: 22023 to the client');
$log = log_since($node, $from);
like($log, qr/ERROR:  reason is longer than 1000 characters/, '3: the error is logged');
unlike($log, qr/\Q$leak\E/, '3: the token is not in the log');
is(sql($node, 'ql', qq{SELECT revoked_at IS NULL FROM apikeys.keys WHERE id = '$leak_id'}), 't',
	'3: and the key is not revoked');

done_testing();

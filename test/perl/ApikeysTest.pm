# Copyright: the apikeys authors.
#
# Helpers the TAP tests (test/tap/*.pl) share: starting a node with the
# suites' configuration, running SQL, creating keys, polling, and reading the
# server log.  make prove_installcheck runs the tests from the repository
# root with -I test/perl.

package ApikeysTest;

use strict;
use warnings;

use Exporter 'import';
use File::Basename qw(dirname);
use File::Spec;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);

our @EXPORT = qw(
  new_node sql try_sql sql_error new_key
  poll_until wait_until avoid_minute_edge
  log_since log_lines no_log_errors
  chain_ok workers_gone_ok queue_drained_ok
  alert_listener alerts_heard);

# test/apikeys.conf, found from this file so that no test depends on its cwd.
my $apikeys_conf =
  File::Spec->rel2abs(File::Spec->catfile(dirname(__FILE__), File::Spec->updir, 'apikeys.conf'));

# Prepended to the helpers' own checks so that no database's search_path
# (005's traps) can take part in them.
my $pinned = "SET search_path = pg_catalog, pg_temp;\n";

# A started node: init(%init), then test/apikeys.conf and $conf (later lines win).
sub new_node
{
	my ($name, $conf, %init) = @_;
	my $node = PostgreSQL::Test::Cluster->new($name);
	$node->init(%init);
	$node->append_conf('postgresql.conf', slurp_file($apikeys_conf) . "\n" . ($conf // ''));
	$node->start;
	return $node;
}

# psql parameters to connect as $user (none when $user is undef).
sub _as
{
	my ($user) = @_;
	return defined $user ? (extra_params => [ '-U', $user ]) : ();
}

# The output of $query in $db (psql -XAtq, no final newline), as $user if given; dies on error.
sub sql
{
	my ($node, $db, $query, $user) = @_;
	return $node->safe_psql($db, $query, _as($user));
}

# The output of $query in $db, or undef if it failed.
sub try_sql
{
	my ($node, $db, $query) = @_;
	my ($ret, $out) = $node->psql($db, $query);
	return $ret == 0 ? $out : undef;
}

# Runs $query expecting errors, SQLSTATEs shown: (psql's exit code, stderr).  Stops at the
# first error unless on_error_stop => 0; user => NAME connects as NAME.
sub sql_error
{
	my ($node, $db, $query, %params) = @_;
	my $user = delete $params{user};
	my ($ret, $out, $err) = $node->psql($db, "\\set VERBOSITY verbose\n$query",
		on_error_stop => 1, _as($user), %params);
	return ($ret, $err);
}

# apikeys.create_key($args) in $db, as $user if given: (key_id, token, start), or it dies.
sub new_key
{
	my ($node, $db, $args, $user) = @_;
	my $row = sql($node, $db, "SELECT key_id, token, start FROM apikeys.create_key($args)", $user);
	my ($id, $token, $start) = split /\|/, $row;
	die "create_key($args) in $db returned '$row'" unless defined $token && $token ne '';
	return ($id, $token, $start);
}

# Polls $query in $db until it prints $expected (errors count as "not yet"): returns the seconds
# it took, or undef after $timeout s (30) with a diag unless quiet => 1; interval => s (0.1).
sub poll_until
{
	my ($node, $db, $query, $expected, $timeout, %opt) = @_;
	$timeout //= 30;
	my $start = time();
	my $last = '';
	while (time() - $start < $timeout)
	{
		my ($ret, $out) = $node->psql($db, $query);
		return time() - $start if $ret == 0 && $out eq $expected;
		$last = $out // '';
		usleep(int(($opt{interval} // 0.1) * 1_000_000));
	}
	diag("timed out after $timeout s waiting for '$expected' from: $query\nlast output: '$last'")
	  unless $opt{quiet};
	return undef;
}

# poll_until() for a query that prints 't' when the wait is over.
sub wait_until
{
	my ($node, $db, $query, $timeout, $interval) = @_;
	return poll_until($node, $db, $query, 't', $timeout, interval => $interval);
}

# Past second $latest of the minute, sleeps into the next minute (records and
# rate limits count per minute); returns the current minute (Unix time / 60).
sub avoid_minute_edge
{
	my ($latest) = @_;
	my $s = time() - 60 * int(time() / 60);
	if ($s > $latest)
	{
		note(sprintf('second %.1f > %d: waiting %.1f s for the next minute', $s, $latest, 60.5 - $s));
		usleep(int((60.5 - $s) * 1_000_000));
	}
	return int(time() / 60);
}

# $node's server log from byte $from on.
sub log_since
{
	my ($node, $from) = @_;
	return slurp_file($node->logfile, $from);
}

# The lines of $node's log from byte $from on that match $match and none of @allowed.
sub log_lines
{
	my ($node, $from, $match, @allowed) = @_;
	my @lines = grep { $_ =~ $match } split /\n/, log_since($node, $from);
	for my $allow (@allowed)
	{
		@lines = grep { $_ !~ $allow } @lines;
	}
	return @lines;
}

# Test $name: no ERROR, FATAL or PANIC line in $node's log from byte $from on but @allowed ones.
sub no_log_errors
{
	my ($node, $from, $name, @allowed) = @_;
	local $Test::Builder::Level = $Test::Builder::Level + 1;    # failures name the caller's line
	my @errors = log_lines($node, $from, qr/\b(?:ERROR|FATAL|PANIC):/, @allowed);
	is(scalar(@errors), 0, $name)
	  or diag(join("\n", @errors[ 0 .. ($#errors < 20 ? $#errors : 20) ]));
	return;
}

# Test: apikeys.audit_verify() in $db checks every row of the audit log and finds it ok.
sub chain_ok
{
	my ($node, $db, $label) = @_;
	local $Test::Builder::Level = $Test::Builder::Level + 1;    # failures name the caller's line
	my (undef, $rows) = $node->psql($db, $pinned . 'SELECT count(*) FROM apikeys.audit_log');
	my ($ret, $out, $err) =
	  $node->psql($db, $pinned . 'SELECT ok, rows_checked FROM apikeys.audit_verify()');
	is($out, "t|$rows", "$label: audit_verify() ok in $db ($rows rows)") or diag($err);
	return;
}

# Test: within $timeout s (default 15) no apikeys worker runs on $node.
sub workers_gone_ok
{
	my ($node, $label, $timeout) = @_;
	local $Test::Builder::Level = $Test::Builder::Level + 1;    # failures name the caller's line
	ok( defined wait_until($node, 'postgres', $pinned . q{SELECT count(*) = 0 FROM pg_stat_activity
			WHERE backend_type = 'apikeys worker'}, $timeout // 15),
		"$label: no apikeys worker running");
	return;
}

# Test: within $timeout s (default 15) apikeys.status() in $db reports nothing queued.
sub queue_drained_ok
{
	my ($node, $db, $label, $timeout) = @_;
	local $Test::Builder::Level = $Test::Builder::Level + 1;    # failures name the caller's line
	ok( defined wait_until($node, $db, $pinned . 'SELECT queued_records = 0 FROM apikeys.status()',
			$timeout // 15),
		"$label: nothing queued");
	return;
}

# A session of $node in $db listening to apikeys_alert, for alerts_heard(); end: ->{psql}->quit.
sub alert_listener
{
	my ($node, $db) = @_;
	my $psql = $node->background_psql($db);
	$psql->set_query_timer_restart();    # the timeout applies to each query, not the session
	$psql->query_safe('LISTEN apikeys_alert');
	return { psql => $psql, heard => '', sync => 0 };
}

# The payloads of all apikeys_alert notifications $listener got so far (its output: ->{heard}).
sub alerts_heard
{
	my ($listener) = @_;
	# A query makes psql print the notifications that arrived.
	$listener->{heard} .=
	  $listener->{psql}->query_safe("SELECT 'sync " . $listener->{sync}++ . "'") . "\n";
	my @payloads = $listener->{heard}
	  =~ /Asynchronous notification "apikeys_alert" with payload "(.*)" received from server process/g;
	return @payloads;
}

1;

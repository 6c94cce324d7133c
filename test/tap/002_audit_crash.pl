# Copyright: the apikeys authors.
#
# The audit trail survives a crash: lifecycle rows are written in the
# transaction of the change, so after `pg_ctl -m immediate stop` in the middle
# of a burst of creates, revokes, rotations and revoke_alls, and crash
# recovery,
#   - every key in apikeys.keys has exactly one key_created row,
#   - every revoked key has exactly one revocation row (key_revoked,
#     keys_revoked_all, key_revoked_by_token, or key_rotated for a key
#     rotated without grace), and a key that is not revoked has none,
#   - no audit row names a key that does not exist (work that was rolled
#     back, or in flight at the crash, left nothing),
#   - every operation a client saw acknowledged as committed is there, with
#     its audit row,
#   - apikeys.audit_verify() is ok, and the chain goes on after recovery.
# This is done twice: once crashing in the middle of the flowing burst, once
# with a transaction that holds the audit chain's lock (and the others waiting
# for it) at the moment of the crash.
#
# The clients are psql processes running generated scripts; after each
# statement's commit is acknowledged they \echo what was done, and with
# ON_ERROR_STOP a statement whose acknowledgement never came (the server went
# away) stops the script before its \echo.
#
# Run from the repository root (make prove_installcheck), with the helpers
# of test/perl/ApikeysTest.pm.

use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use FindBin;
use lib "$FindBin::RealBin/../perl";    # test/perl: ApikeysTest
use ApikeysTest;
use IPC::Run;
use Time::HiRes qw(time usleep);

my $t0 = time();

my $node = new_node('crash', "log_statement = none\n");

$node->safe_psql('postgres', 'CREATE DATABASE crashdb');
$node->safe_psql('crashdb', 'CREATE EXTENSION apikeys');

# Owners: "shared" is written by two sessions at once (creates, revokes and
# revoke_all racing each other); "solo2" and "solo3" belong to one session
# each, which also rotates keys; solo3 moves between plans.
sql($node, 'crashdb', q{
	SELECT apikeys.set_plan('shared', 'enterprise');
	SELECT apikeys.set_plan('solo2', 'enterprise');
	SELECT apikeys.set_plan('solo3', 'pro');
});

my $tempdir = PostgreSQL::Test::Utils::tempdir;

# The script of one session: $iterations rounds of work for $owner, each
# acknowledged step \echo'ed after its commit.  $rotate: the session owns its
# owner alone and may rotate (a rotation of a key another session revoked
# would fail); $plans: toggle the owner's plan now and then.
sub session_script
{
	my ($sid, $owner, $rotate, $plans, $iterations) = @_;
	my $s = "\\set ON_ERROR_STOP 1\n";
	for my $i (1 .. $iterations)
	{
		$s .= "SELECT key_id AS k, token AS t FROM apikeys.create_key('$owner', 's$sid k$i') \\gset\n";
		$s .= "\\echo created :k\n";
		if ($i % 3 == 0)
		{
			# A failed verification: queued, written by the worker.
			$s .= "SELECT code AS c FROM apikeys.verify(:'t', '{nope}') \\gset\n";
		}
		if ($i % 4 == 1)
		{
			$s .= "SELECT apikeys.revoke(:'k', NULL, 'burst') AS r \\gset\n";
			$s .= "\\echo revoked :k\n";
			$s .= "SELECT code AS c FROM apikeys.verify(:'t') \\gset\n";
		}
		elsif ($i % 4 == 2)
		{
			$s .= "SELECT apikeys.revoke_token(:'t') AS r \\gset\n";
			$s .= "\\echo revoked :k\n";
		}
		elsif ($i % 4 == 3 && $rotate)
		{
			$s .= "SELECT key_id AS n FROM apikeys.rotate(:'k') \\gset\n";
			$s .= "\\echo rotated :k :n\n";
		}
		if ($i % 5 == 0)
		{
			# Rolled back: must leave no key and no audit row.
			$s .= "BEGIN;\n";
			$s .= "SELECT key_id AS rb FROM apikeys.create_key('$owner', 's$sid rollback $i') \\gset\n";
			$s .= "SELECT apikeys.revoke(:'rb', NULL, 'rolled back') AS r \\gset\n";
			$s .= "ROLLBACK;\n";
			$s .= "\\echo rolledback :rb\n";
		}
		if ($plans && $i % 7 == 0)
		{
			my $plan = ($i / 7) % 2 ? 'enterprise' : 'pro';
			$s .= "SELECT apikeys.set_plan('$owner', '$plan') AS x \\gset\n";
			$s .= "\\echo plan $owner $plan\n";
		}
		if ($i % 10 == 0)
		{
			$s .= "SELECT apikeys.revoke_all('$owner', 'sweep') AS c \\gset\n";
			$s .= "\\echo revoked_all $owner :c\n";
		}
	}
	$s .= "\\echo done\n";
	return $s;
}

my @sessions = (
	[ 1, 'shared', 0, 0 ],
	[ 2, 'solo2',  1, 0 ],
	[ 3, 'solo3',  1, 1 ],
	[ 4, 'shared', 0, 0 ],);

# Starts the burst; returns the harnesses and their output buffers.
sub start_burst
{
	my ($round, $iterations) = @_;
	my @running;
	for my $sess (@sessions)
	{
		my ($sid, $owner, $rotate, $plans) = @$sess;
		my $file = "$tempdir/round$round-s$sid.sql";
		open my $fh, '>', $file or die "$file: $!";
		print $fh session_script($sid, $owner, $rotate, $plans, $iterations);
		close $fh;
		my ($out, $err) = ('', '');
		my $h = IPC::Run::start(
			[ 'psql', '-X', '-q', '-A', '-t', '-d', $node->connstr('crashdb'), '-f', $file ],
			'<', \undef, '>', \$out, '2>', \$err,
			IPC::Run::timeout($PostgreSQL::Test::Utils::timeout_default));
		push @running, { sid => $sid, owner => $owner, h => $h, out => \$out, err => \$err };
	}
	return \@running;
}

# Waits (bounded) for every psql to exit after the crash.  A session must
# have been ended by the crash alone: no SQL error before it (with
# ON_ERROR_STOP an error would have stopped its script early).
sub finish_burst
{
	my ($running, $label) = @_;
	for my $r (@$running)
	{
		eval { $r->{h}->finish; };
		my $err = ${ $r->{err} };
		my @errors = grep { /\b(ERROR|FATAL):/ } split /\n/, $err;
		is(scalar(@errors), 0, "$label: session $r->{sid} ran without an error until the crash")
		  or diag("session $r->{sid} stderr:\n$err");
	}
	return;
}

# Server-side progress, for choosing the moment of the crash; gives up early
# when a session has exited (it must not before the crash).
sub wait_for_keys
{
	my ($running, $n, $timeout) = @_;
	my $deadline = time() + $timeout;
	while (time() < $deadline)
	{
		for my $r (@$running)
		{
			$r->{h}->pump_nb if $r->{h}->pumpable;
			if (!$r->{h}->pumpable)
			{
				diag("session $r->{sid} exited before the crash: " . ${ $r->{err} });
				return -1;
			}
		}
		my $c = sql($node, 'crashdb', 'SELECT count(*) FROM apikeys.keys');
		return $c if $c >= $n;
		usleep(50_000);
	}
	return -1;
}

# What the clients saw acknowledged, across rounds.
my (%created, %revoked, %rotated, %rolledback);
my @revoked_all;    # [ session, owner, created-before set ]
my %created_in_session;

sub collect_acks
{
	my ($running, $label) = @_;
	my $ops = 0;
	for my $r (@$running)
	{
		my $sid = $r->{sid};
		my @lines = split /\n/, ${ $r->{out} };
		ok(!grep({ $_ eq 'done' } @lines), "$label: session $sid was stopped mid-burst");
		for my $line (@lines)
		{
			$ops++;
			if ($line =~ /^created (\S+)$/)
			{
				$created{$1} = $sid;
				$created_in_session{$sid}{$1} = 1;
			}
			elsif ($line =~ /^revoked (\S+)$/) { $revoked{$1} = $sid; }
			elsif ($line =~ /^rotated (\S+) (\S+)$/)
			{
				$rotated{$1} = $2;
				$created{$2} = $sid;
				$created_in_session{$sid}{$2} = 1;
			}
			elsif ($line =~ /^rolledback (\S+)$/) { $rolledback{$1} = $sid; }
			elsif ($line =~ /^revoked_all (\S+) (\d+)$/)
			{
				push @revoked_all, [ $sid, $1, [ keys %{ $created_in_session{$sid} } ] ];
			}
			elsif ($line =~ /^plan /) { }
			else
			{
				$ops--;
				fail("$label: session $sid printed an unexpected line: $line");
			}
		}
	}
	note("$label: $ops acknowledged operations");
	return $ops;
}

# The audit log and keys as the server has them now, checked against the
# invariants and against what the clients saw acknowledged.
sub check_after_recovery
{
	my ($label) = @_;

	my $verify = sql($node, 'crashdb', 'SELECT ok, rows_checked, first_bad_id FROM apikeys.audit_verify()');
	my $rows   = sql($node, 'crashdb', 'SELECT count(*) FROM apikeys.audit_log');
	is($verify, "t|$rows|", "$label: audit_verify() ok over all $rows rows");

	# Key-level invariants, computed server-side.
	is(sql($node, 'crashdb', q{
		SELECT count(*) FROM apikeys.keys k
		 WHERE (SELECT count(*) FROM apikeys.audit_log a
		         WHERE a.key_id = k.id AND a.event = 'key_created'
		           AND a.owner = k.owner) <> 1}),
		'0', "$label: every key has exactly one key_created row");
	is(sql($node, 'crashdb', q{
		SELECT count(*) FROM apikeys.keys k
		 WHERE k.revoked_at IS NOT NULL AND k.replaced_by IS NULL
		   AND (SELECT count(*) FROM apikeys.audit_log a
		         WHERE a.key_id = k.id
		           AND a.event IN ('key_revoked', 'keys_revoked_all', 'key_revoked_by_token',
		                           'key_rotated')) <> 1}),
		'0', "$label: every revoked key has exactly one revocation row");
	is(sql($node, 'crashdb', q{
		SELECT count(*) FROM apikeys.keys k
		 WHERE k.replaced_by IS NOT NULL
		   AND ((SELECT count(*) FROM apikeys.audit_log a
		          WHERE a.key_id = k.id AND a.event = 'key_rotated') <> 1
		        OR EXISTS (SELECT FROM apikeys.audit_log a
		                    WHERE a.key_id = k.id
		                      AND a.event IN ('key_revoked', 'keys_revoked_all',
		                                      'key_revoked_by_token')))}),
		'0', "$label: every rotated key has exactly one key_rotated row and no other revocation");
	is(sql($node, 'crashdb', q{
		SELECT count(*) FROM apikeys.keys k
		 WHERE k.revoked_at IS NULL
		   AND EXISTS (SELECT FROM apikeys.audit_log a
		                WHERE a.key_id = k.id
		                  AND a.event IN ('key_revoked', 'keys_revoked_all', 'key_revoked_by_token',
		                                  'key_rotated'))}),
		'0', "$label: no revocation row for a key that is not revoked");
	is(sql($node, 'crashdb', q{
		SELECT count(*) FROM apikeys.audit_log a
		 WHERE a.key_id IS NOT NULL
		   AND NOT EXISTS (SELECT FROM apikeys.keys k WHERE k.id = a.key_id)}),
		'0', "$label: no audit row refers to a key that does not exist");
	is(sql($node, 'crashdb', q{SELECT count(*) FROM apikeys.audit_log WHERE event = 'key_created'}),
		sql($node, 'crashdb', q{SELECT count(*) FROM apikeys.keys}),
		"$label: as many key_created rows as keys");
	is(sql($node, 'crashdb', q{
		SELECT count(*) FROM apikeys.owners o
		 WHERE (SELECT count(*) FROM apikeys.audit_log a
		         WHERE a.owner = o.owner AND a.event = 'owner_created') <> 1}),
		'0', "$label: every owner has exactly one owner_created row");
	is(sql($node, 'crashdb', q{
		SELECT count(*) FROM apikeys.owners o
		 WHERE o.plan IS DISTINCT FROM (
		       SELECT CASE a.event WHEN 'plan_changed' THEN a.details->>'to'
		                           ELSE a.details->>'plan' END
		         FROM apikeys.audit_log a
		        WHERE a.owner = o.owner AND a.event IN ('owner_created', 'plan_changed')
		        ORDER BY a.id DESC LIMIT 1)}),
		'0', "$label: every owner's plan is the one its last plan row names");

	# Client-side acknowledgements.
	my %keys = map { my ($id, $rev, $repl, $from) = split /\|/; ($id => [ $rev, $repl, $from ]) }
	  split /\n/, sql($node, 'crashdb', q{SELECT id, revoked_at IS NOT NULL, coalesce(replaced_by::text, ''),
	                          coalesce(rotated_from::text, '') FROM apikeys.keys});
	my %events;
	for (split /\n/, sql($node, 'crashdb', q{SELECT key_id, event FROM apikeys.audit_log WHERE key_id IS NOT NULL}))
	{
		my ($id, $ev) = split /\|/;
		$events{$id}{$ev}++;
	}

	my @missing = grep { !exists $keys{$_} || !$events{$_}{key_created} } keys %created;
	is(scalar(@missing), 0,
		"$label: all " . scalar(keys %created) . " acknowledged creates are there with key_created")
	  or diag("missing: @missing");

	my @not_revoked = grep {
		!exists $keys{$_} || $keys{$_}[0] ne 't'
		  || !($events{$_}{key_revoked} || $events{$_}{keys_revoked_all}
			|| $events{$_}{key_revoked_by_token} || $events{$_}{key_rotated})
	} keys %revoked;
	is(scalar(@not_revoked), 0,
		"$label: all " . scalar(keys %revoked) . " acknowledged revocations are there with their row")
	  or diag("not revoked: @not_revoked");

	my @bad_rot = grep {
		my $new = $rotated{$_};
		!exists $keys{$_} || $keys{$_}[1] ne $new || !$events{$_}{key_rotated}
		  || !exists $keys{$new} || $keys{$new}[2] ne $_
	} keys %rotated;
	is(scalar(@bad_rot), 0,
		"$label: all " . scalar(keys %rotated) . " acknowledged rotations are there with key_rotated")
	  or diag("bad rotations: @bad_rot");

	my @ghosts = grep { exists $keys{$_} || exists $events{$_} } keys %rolledback;
	is(scalar(@ghosts), 0,
		"$label: none of the " . scalar(keys %rolledback) . " rolled back keys left a key or an audit row")
	  or diag("ghosts: @ghosts");

	# A revoke_all acknowledged by a session that alone writes its owner
	# revoked every key that session had created before it.
	my @survivors;
	for my $ra (@revoked_all)
	{
		my ($sid, $owner, $before) = @$ra;
		next if $owner eq 'shared';
		push @survivors, grep { !exists $keys{$_} || $keys{$_}[0] ne 't' } @$before;
	}
	is(scalar(@survivors), 0,
		"$label: " . scalar(@revoked_all) . " acknowledged revoke_alls revoked what came before them")
	  or diag("not revoked by revoke_all: @survivors");
	return;
}

#
# Round 1: crash in the middle of the flowing burst.
#
my $log_from = -s $node->logfile;
my $running = start_burst(1, 5000);
my $n = wait_for_keys($running, 300, 30);
ok($n >= 300, "round 1: burst under way ($n keys)");
$node->stop('immediate');
finish_burst($running, 'round 1');
cmp_ok(collect_acks($running, 'round 1'), '>', 100, 'round 1: clients saw operations acknowledged');
no_log_errors($node, $log_from, 'round 1: no ERROR in the server log');
$log_from = -s $node->logfile;
$node->start;
check_after_recovery('round 1');

#
# Round 2: the burst again, then a transaction takes the chain's lock (its
# key_created row written, not committed) and the others queue behind it;
# crash then.
#
my $keys_before = sql($node, 'crashdb', 'SELECT count(*) FROM apikeys.keys');
$running = start_burst(2, 5000);
$n = wait_for_keys($running, $keys_before + 150, 30);
ok($n >= $keys_before + 150, "round 2: burst under way ($n keys)");
my $open = $node->background_psql('crashdb');
my $open_id = $open->query_safe(
	q{BEGIN; SELECT key_id FROM apikeys.create_key('solo2', 'never committed');});
like($open_id, qr/^[0-9a-f-]{36}$/, 'round 2: an open transaction created a key');
# Let the other sessions pile up behind the chain's lock.
usleep(300_000);
is( sql($node, 'crashdb', q{SELECT count(*) > 0 FROM pg_stat_activity
	       WHERE datname = 'crashdb' AND wait_event_type = 'Lock' AND wait_event = 'transactionid'}),
	't', 'round 2: sessions wait for the audit chain lock');
$node->stop('immediate');
finish_burst($running, 'round 2');
eval { $open->quit; };
$rolledback{$open_id} = 'open';
cmp_ok(collect_acks($running, 'round 2'), '>', 50, 'round 2: clients saw operations acknowledged');
no_log_errors($node, $log_from, 'round 2: no ERROR in the server log');
$log_from = -s $node->logfile;
$node->start;
check_after_recovery('round 2');

#
# The chain goes on after recovery: a new key's row links to the old tail.
#
my ($tail_id, $tail_hash) = split /\|/,
  sql($node, 'crashdb', q{SELECT id, encode(hash, 'hex') FROM apikeys.audit_log ORDER BY id DESC LIMIT 1});
my ($new_id) = new_key($node, 'crashdb', q{'after', 'after recovery'});
is( sql($node, 'crashdb', qq{SELECT encode(prev_hash, 'hex') = '$tail_hash'
	         FROM apikeys.audit_log WHERE id = $tail_id + 1}),
	't', 'after recovery: the next audit row chains to the recovered tail');
is( sql($node, 'crashdb', qq{SELECT count(*) FROM apikeys.audit_log
	        WHERE id > $tail_id AND key_id = '$new_id' AND event = 'key_created'}),
	'1', 'after recovery: the new key has its key_created row');
sql($node, 'crashdb', qq{SELECT apikeys.revoke('$new_id')});
chain_ok($node, 'crashdb', 'after recovery, with the new rows');

# Failed verifications after recovery still reach the log (a worker starts
# again in the restarted server).
my ($rev_id, $rev_tok) = new_key($node, 'crashdb', q{'after', 'revoked after recovery'});
sql($node, 'crashdb', qq{SELECT apikeys.revoke('$rev_id')});
sql($node, 'crashdb', qq{SELECT code FROM apikeys.verify('$rev_tok')});
ok( defined wait_until($node, 'crashdb', qq{SELECT count(*) > 0 FROM apikeys.audit_log
	                WHERE event = 'verify_failed' AND key_id = '$rev_id'}, 20),
	'after recovery: a failed verification is written by a worker');
chain_ok($node, 'crashdb', 'after recovery, still');

no_log_errors($node, $log_from, 'after recovery: no ERROR in the server log');

$node->stop;
note(sprintf('002_audit_crash took %.1f s', time() - $t0));
done_testing();

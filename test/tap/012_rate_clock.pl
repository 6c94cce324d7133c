# Copyright: the apikeys authors.
#
# Rate limits across the calendar and the clock, on a server whose wall
# clock the test sets: libfaketime (Debian's libfaketime) is preloaded into
# the postmaster alone, which reads the clock's offset from a file at every
# call; the monotonic clock, which PostgreSQL's timeouts use, is left alone.
# A key's rate-limit state is one shared-memory entry, whatever the day.
#
#  1. Midnight: a key with rate_limit 1 and rate_burst 2 spends its burst
#     (3 requests) at 23:59:50; five seconds into the next day it is still
#     RATE_LIMITED.  No fresh burst at midnight.
#  2. A day without requests: rate_limit 1 and rate_burst 10000 (a burst of
#     about a week).  10001 pass at noon; 36 hours later, with no request
#     on the day between, 2160 more pass (one a minute since), not a fresh
#     10001.  (The state once lived in each day's entry and was carried
#     from the day before only, so a day without requests lost it.)
#  3. The clock set back an hour: a key with rate_limit 60 and no burst,
#     used once, is refused for at most one interval (1 s), with a
#     ratelimit_reset that close, and then passes; the state is not taken as
#     an hour's debt.
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
use Time::HiRes qw(time sleep);
use Time::Local qw(timegm);

my ($libfaketime) = glob('/usr/lib/*/faketime/libfaketime.so.1');
ok(defined $libfaketime && -e $libfaketime, 'libfaketime is installed')
  or BAIL_OUT('libfaketime is missing: apt-get install libfaketime');

my $offset_file = PostgreSQL::Test::Utils::tempdir() . '/clock';

# Sets the server's wall clock to $epoch (seconds, UTC), from now on, to
# within a second (so the times below keep a few seconds from midnight).
sub set_clock
{
	my ($epoch) = @_;
	my $offset = sprintf('%+d', int($epoch - time()));
	open(my $fh, '>', $offset_file) or die "cannot write $offset_file: $!";
	print $fh "$offset\n";
	close($fh);
}

set_clock(time());
my $node;
{
	local $ENV{LD_PRELOAD} = $libfaketime;
	local $ENV{FAKETIME_TIMESTAMP_FILE} = $offset_file;
	local $ENV{FAKETIME_NO_CACHE} = '1';
	local $ENV{FAKETIME_DONT_FAKE_MONOTONIC} = '1';
	$node = new_node('rateclock');
}
$node->safe_psql('postgres', 'CREATE DATABASE rc');
sql($node, 'rc', 'CREATE EXTENSION apikeys');
sql($node, 'rc', q{SELECT apikeys.set_plan('clock', 'enterprise')});

# The VALID answers of $n verifications of $token, in one statement.
sub valid_of
{
	my ($token, $n) = @_;
	return sql($node, 'rc',
		qq{SELECT count(*) FILTER (WHERE v.code = 'VALID')
		     FROM generate_series(1, $n) i,
		          LATERAL apikeys.verify(CASE WHEN i > 0 THEN '$token' END) v});
}

# 1. Midnight.
set_clock(timegm(50, 59, 23, 10, 2, 2027));    # 2027-03-10 23:59:50
is(sql($node, 'rc', q{SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI')}),
	'2027-03-10 23:59', '1: the server reads the clock the test set');
my (undef, $midnight) = new_key($node, 'rc', q{'clock', 'midnight', rate_limit => 1, rate_burst => 2});
is(valid_of($midnight, 4), '3', '1: 3 of 4 pass at 23:59:50 (1 a minute, burst 2)');
set_clock(timegm(5, 0, 0, 11, 2, 2027));       # 2027-03-11 00:00:05
is(sql($node, 'rc', qq{SELECT code FROM apikeys.verify('$midnight')}),
	'RATE_LIMITED', '1: still RATE_LIMITED at 00:00:05: no fresh burst at midnight');

# 2. A day without requests.
set_clock(timegm(0, 0, 12, 12, 2, 2027));      # 2027-03-12 12:00:00
my (undef, $weekly) = new_key($node, 'rc', q{'clock', 'weekly', rate_limit => 1, rate_burst => 10000});
is(valid_of($weekly, 10002), '10001', '2: 10001 of 10002 pass at noon (1 a minute, burst 10000)');
set_clock(timegm(5, 0, 0, 14, 2, 2027));       # 2027-03-14 00:00:05, 36 hours later
my $regained = valid_of($weekly, 3000);
# The test sets the clock to the second: 2160 minutes, give or take one request.
ok($regained >= 2159 && $regained <= 2161,
	"2: 36 hours later, $regained of 3000 pass: the 2160 minutes since, not a fresh burst");

# 3. The clock set back an hour.
set_clock(timegm(0, 0, 10, 15, 2, 2027));      # 2027-03-15 10:00:00
my (undef, $paced) = new_key($node, 'rc', q{'clock', 'paced', rate_limit => 60, rate_burst => 0});
is(sql($node, 'rc', qq{SELECT code FROM apikeys.verify('$paced')}), 'VALID', '3: passes at 10:00');
set_clock(timegm(0, 0, 9, 15, 2, 2027));       # 09:00:00
my $answer = sql($node, 'rc',
	qq{SELECT code || '|' || (ratelimit_reset - clock_timestamp() <= interval '1.5 seconds')
	     FROM apikeys.verify('$paced')});
is($answer, 'RATE_LIMITED|true', '3: set back an hour, refused for at most an interval');
sleep(1.2);
is(sql($node, 'rc', qq{SELECT code FROM apikeys.verify('$paced')}),
	'VALID', '3: passes 1.2 s later, not an hour later');

$node->stop;
done_testing();

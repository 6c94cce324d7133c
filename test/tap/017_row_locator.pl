# Copyright: the apikeys authors.
#
# The row locator after a vacuum truncates apikeys.keys, on a primary and
# on a streaming standby (both preloaded, each with a locator of its own).
#
#  1. Five keys are created after 3,000 others and before 1,000 more, so
#     their rows lie in the table's last pages; they are verified on both
#     servers (VALID), which records where their rows are.
#  2. Every key but the first is deleted (bulk, without triggers) and the
#     primary is vacuumed until the table has shrunk below the first of the
#     five keys' blocks; the standby replays the truncation.
#  3. The five tokens, whose records now point past the table's end, are
#     answered API_KEY_INVALID on both servers, with no error (without the
#     check of the table's length: "could not read block"); the first key
#     is still VALID on both, and a key created afterwards is VALID (its
#     row recorded, maybe at a place the deleted keys' records name).
#  4. Neither server's log has an ERROR.
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
use Time::HiRes qw(usleep);

my $primary = new_node('primary', undef, allows_streaming => 1);
sql($primary, 'postgres', 'CREATE DATABASE app');
sql($primary, 'app', q{CREATE EXTENSION apikeys; SELECT apikeys.set_plan('acme', 'enterprise')});

# 1. The first key in the table's first page, five in its last pages.
my ($first_id, $first_token) = new_key($primary, 'app', q{'acme', 'first'});

# Keys without triggers (no audit, no limits): only their rows matter here.
sub filler_keys
{
	my ($n) = @_;
	sql($primary, 'app', qq{
SET session_replication_role = replica;
INSERT INTO apikeys.keys (owner, name, prefix, start, digest)
SELECT 'acme', 'filler', 'ak_live', apikeys.start(t.token), apikeys.digest(t.token)
  FROM (SELECT apikeys._new_token('ak_live')::text::apikeys.apikey AS token
          FROM generate_series(1, $n)) t});
}
filler_keys(3000);
my @tail;
push @tail, [ new_key($primary, 'app', qq{'acme', 'tail $_'}) ] for 1 .. 5;
filler_keys(1000);

my $standby_backup = 'b';
$primary->backup($standby_backup);
my $standby = PostgreSQL::Test::Cluster->new('standby');
$standby->init_from_backup($primary, $standby_backup, has_streaming => 1);
$standby->append_conf('postgresql.conf', "shared_preload_libraries = 'apikeys'\n");
$standby->start;
$primary->wait_for_catchup($standby);

# verify's code for each token, comma-separated, on $node.
sub codes
{
	my ($node, @tokens) = @_;
	return join ',', map { sql($node, 'app', "SELECT code FROM apikeys.verify('$_')") } @tokens;
}
my @tail_tokens = map { $_->[1] } @tail;
my $all_valid = join ',', ('VALID') x 5;
is(codes($primary, @tail_tokens), $all_valid, '1: the five keys are VALID on the primary');
is(codes($standby, @tail_tokens), $all_valid, '1: ... and on the standby');
is(codes($primary, @tail_tokens), $all_valid, '1: ... and again (read where recorded)');

my $tail_ids = join ',', map { "'$_->[0]'" } @tail;
my $first_tail_block = sql($primary, 'app',
	"SELECT min((ctid::text::point)[0])::bigint FROM apikeys.keys WHERE id IN ($tail_ids)");
my $first_block = sql($primary, 'app',
	"SELECT (ctid::text::point)[0]::bigint FROM apikeys.keys WHERE id = '$first_id'");
cmp_ok($first_tail_block, '>', $first_block, '1: the five lie after the first key');

# 2. Delete all but the first key, and vacuum until the table has shrunk
# below the five (a snapshot still open elsewhere can keep the dead rows a
# little longer).
sql($primary, 'app', qq{
SET session_replication_role = replica;
DELETE FROM apikeys.keys WHERE id <> '$first_id'});
my $shrunk = 0;
for (1 .. 60)
{
	sql($primary, 'app', 'VACUUM apikeys.keys');
	$shrunk = sql($primary, 'app',
		"SELECT pg_relation_size('apikeys.keys') / current_setting('block_size')::int <= $first_tail_block");
	last if $shrunk eq 't';
	usleep(500_000);
}
is($shrunk, 't', '2: a vacuum truncated the table below the five keys\' rows');
$primary->wait_for_catchup($standby, 'replay');
is(sql($standby, 'app',
		"SELECT pg_relation_size('apikeys.keys') / current_setting('block_size')::int <= $first_tail_block"),
	't', '2: ... and the standby replayed it');

# 3. Records past the end answer from the index: unknown keys, no error.
my $all_invalid = join ',', ('API_KEY_INVALID') x 5;
is(codes($primary, @tail_tokens), $all_invalid, '3: the five tokens are API_KEY_INVALID on the primary');
is(codes($standby, @tail_tokens), $all_invalid, '3: ... and on the standby');
is(codes($primary, $first_token), 'VALID', '3: the first key is VALID on the primary');
is(codes($standby, $first_token), 'VALID', '3: ... and on the standby');
my (undef, $new_token) = new_key($primary, 'app', q{'acme', 'after'});
$primary->wait_for_catchup($standby);
is(codes($primary, $new_token, $new_token), 'VALID,VALID', '3: a key created afterwards is VALID');
is(codes($standby, $new_token, $new_token), 'VALID,VALID', '3: ... on the standby too');

# 4. No server logged an error.
no_log_errors($_, 0, '4: no ERROR, FATAL or PANIC in the ' . $_->name . "'s log") for $primary, $standby;

$standby->stop;
$primary->stop;
done_testing();

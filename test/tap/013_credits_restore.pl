# Copyright: the apikeys authors.
#
# Credit balances after pg_restore --clean into the same database, on a
# running server.  Shared memory holds each key's balance and unwritten
# spending by database and key id; a restore drops the extension and makes
# its tables again, with the dumped rows (the same key ids, generation 0).
# Those rows decide the balance: a balance and spending of the dropped
# table's rows must neither stand in for the restored column nor be
# written into it.
#
#  1. A key with 100 credits is dumped; 90 are then spent and written,
#     and 5 more spent but not written (apikeys.usage_flush_interval = 1h
#     and a session kept connected, so that only apikeys.flush() writes).
#  2. pg_restore --clean --if-exists into that database: the restored key
#     has 100 credits left (not the 5 left before the restore), and after a
#     flush its column still says 100 (the 5 unwritten are not taken from
#     it); 3 spent then are written, leaving 97.
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

my $node = new_node('restore', "apikeys.usage_flush_interval = '1h'\n");
$node->safe_psql('postgres', 'CREATE DATABASE rs');
sql($node, 'rs', 'CREATE EXTENSION apikeys');
sql($node, 'rs', q{SELECT apikeys.set_plan('restored', 'enterprise')});
my ($id, $token) = new_key($node, 'rs', q{'restored', 'k', credits => 100});

# 1. Dumped at 100; 90 spent and written, 5 spent and not.
my $dump = PostgreSQL::Test::Utils::tempdir() . '/rs.dump';
$node->command_ok([ 'pg_dump', '-Fc', '-f', $dump, '-d', $node->connstr('rs') ], '1: pg_dump');
my $held = $node->background_psql('rs');
my $spend = sub {
	my ($n) = @_;
	return $held->query_safe(
		qq{SELECT count(*) FILTER (WHERE v.code = 'VALID')
		     FROM generate_series(1, $n) i, LATERAL apikeys.verify('$token', cost => 1 + 0 * i) v});
};
is($spend->(90), '90', '1: 90 spent');
$held->query_safe('SELECT apikeys.flush()');
is($spend->(5), '5', '1: 5 more spent');
is(sql($node, 'rs', qq{SELECT credits FROM apikeys.keys WHERE id = '$id'}),
	'10', '1: the column holds the 90 written, not the 5');

# 2. Restored into the same database.
$node->command_ok(
	[ 'pg_restore', '--clean', '--if-exists', '--exit-on-error', '-d', $node->connstr('rs'), $dump ],
	'2: pg_restore --clean into the same database');
is(sql($node, 'rs', qq{SELECT credits FROM apikeys.keys WHERE id = '$id'}),
	'100', '2: the restored row has 100 credits');
is(sql($node, 'rs', qq{SELECT code || '/' || credits_remaining FROM apikeys.verify('$token', cost => 0)}),
	'VALID/100', '2: verify sees the restored 100, not the 5 left before');
$held->query_safe('SELECT apikeys.flush()');
is(sql($node, 'rs', qq{SELECT credits FROM apikeys.keys WHERE id = '$id'}),
	'100', '2: a flush writes none of the old table\'s spending into the restored row');
is($spend->(3), '3', '2: 3 spent after the restore');
$held->query_safe('SELECT apikeys.flush()');
is(sql($node, 'rs', qq{SELECT credits FROM apikeys.keys WHERE id = '$id'}),
	'97', '2: and written: 97 left');
$held->quit;

$node->stop;
done_testing();

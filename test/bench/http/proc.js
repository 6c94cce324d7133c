'use strict';
// CPU time of processes from /proc, in clock ticks (getconf CLK_TCK), for
// test/bench/http.sh.  Linux only.
//
//   node proc.js ticks PID                 the cluster's CPU so far (clusterTicks)
//   node proc.js drain PID ROLE [SECONDS]  waits until the cluster is quiet, then
//                                          prints clusterTicks (see drain below)

const fs = require('node:fs');

// Fields of /proc/PID/stat.  The command name, in parentheses, may hold
// spaces and parentheses itself, so the fields are counted from the last ')'.
function stat(pid) {
  const s = fs.readFileSync(`/proc/${pid}/stat`, 'latin1');
  const f = s.slice(s.lastIndexOf(')') + 2).split(' ');
  return { ppid: Number(f[1]), utime: Number(f[11]), stime: Number(f[12]),
           cutime: Number(f[13]), cstime: Number(f[14]) };
}

// utime + stime of one process; 0 once it has gone.
function processTicks(pid) {
  try {
    const s = stat(pid);
    return s.utime + s.stime;
  } catch (err) {
    if (err.code === 'ENOENT' || err.code === 'ESRCH') return 0;
    throw err;
  }
}

// The live children of PID: [{ pid, ticks, title }].
function children(pid) {
  const out = [];
  for (const name of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(name)) continue;
    try {
      const s = stat(name);
      if (s.ppid !== pid) continue;
      const title = fs.readFileSync(`/proc/${name}/cmdline`, 'latin1').replace(/\0+$/, '');
      out.push({ pid: Number(name), ticks: s.utime + s.stime, title });
    } catch (err) {
      if (err.code !== 'ENOENT' && err.code !== 'ESRCH') throw err;   // exited meanwhile
    }
  }
  return out;
}

// All CPU the cluster has used: the postmaster's own, every live child's
// (backends, the apikeys launcher and worker, checkpointer, ...), and the
// postmaster's cutime + cstime, which holds the CPU of children that have
// exited and been reaped (closed connections, a retired apikeys worker), so
// the sum never goes back when a process ends.  The postmaster is read first:
// a child reaped between the two reads is missed once rather than counted twice.
function clusterTicks(postmaster) {
  const pm = stat(postmaster);
  let ticks = pm.utime + pm.stime + pm.cutime + pm.cstime;
  for (const c of children(postmaster)) ticks += c.ticks;
  return ticks;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// Waits until no apikeys worker runs and no backend of ROLE is left, for a
// full second, at most SECONDS: the worker has written the round's counts
// (at its next audit flush once no client is connected) and retired, and
// the service's connections have ended, so the next round pays for none of
// it.  Reads /proc only, never connects, so it adds no backend of its own.
// Returns whether the cluster went quiet.
async function drain(postmaster, role, seconds = 90) {
  const busy = (t) => t.startsWith('postgres: apikeys worker') || t.startsWith(`postgres: ${role} `);
  const deadline = Date.now() + seconds * 1000;
  let quietSince = null;
  while (Date.now() < deadline) {
    if (children(postmaster).some((c) => busy(c.title))) {
      quietSince = null;
    } else {
      quietSince = quietSince ?? Date.now();
      if (Date.now() - quietSince >= 1000) return true;
    }
    await sleep(100);
  }
  return false;
}

module.exports = { clusterTicks, processTicks, drain };

if (require.main === module) {
  const [cmd, pid, role, seconds] = process.argv.slice(2);
  if (cmd === 'ticks' && pid) {
    console.log(clusterTicks(Number(pid)));
  } else if (cmd === 'drain' && pid && role) {
    drain(Number(pid), role, seconds ? Number(seconds) : undefined).then((quiet) => {
      if (!quiet) console.error(`proc.js: the cluster is still busy after ${seconds || 90} s`);
      console.log(clusterTicks(Number(pid)));
    });
  } else {
    console.error('usage: node proc.js ticks PID | node proc.js drain PID ROLE [SECONDS]');
    process.exit(2);
  }
}

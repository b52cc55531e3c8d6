"""State shared by the nodes of a cluster (:class:`pymta.interfaces.IClusterState`): ``local``
(this node alone, in process) and ``redis`` (GCRA rates, connection leases and greylisting as
atomic Lua scripts, loaded once and called by SHA).

The redis backend never blocks the reactor (txredisapi, a Twisted-native client) and bounds every
call by ``timeout``. When a call fails or times out the node goes local: each rate and cap is
divided by the number of nodes last seen alive (a heartbeat per node), and a probe every heartbeat
brings it back to the shared state when Redis answers again. Each switch is logged
(``event="cluster_fallback"`` / ``"cluster_shared"``) and counted in ``switches``.

Records (pushback pauses, operator suspensions) are kept in one Redis hash per table, each with
the time it lapses, and every change is published on the ``pymta:records`` channel in the same
script: each node listens there on a connection of its own (:mod:`pymta.state.channel`) and reads
a changed table at once. Every node also reads the tables it watches on each heartbeat that
reaches Redis, when it joins and whenever its subscription is made again, so a node that starts
later, or missed messages while its subscription was down, catches up with what is in force.

Times are the caller's clock (``clock.seconds()``), as the local limiter's: the nodes of a
cluster keep their clocks in step (NTP), as an MTA cluster must for its logs anyway.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import uuid
from collections.abc import Callable
from typing import Any, cast
from urllib.parse import urlsplit

from twisted.internet import defer, task
from twisted.logger import Logger
from zope.interface import implementer

from pymta.interfaces import IClusterState, IInboundState
from pymta.rate import Rate
from pymta.state.channel import Opener, Subscription
from pymta.state.memory import MemoryInboundState

log = Logger(namespace="pymta.state.cluster")

PREFIX = "pymta:"
LOCAL_PREFIX = "local:"  # a rate or cap named local:... is kept per node, never shared

GCRA_LUA = """
local now = tonumber(ARGV[1])
local interval = tonumber(ARGV[2])
local burst = tonumber(ARGV[3])
local cost = tonumber(ARGV[4])
local tat = tonumber(redis.call('GET', KEYS[1]))
local start = now
if tat and tat > now then start = tat end
local new_tat = start + interval * cost
local allow_at = new_tat - interval * burst
if allow_at > now + 1e-9 then return string.format('%.17g', allow_at - now) end
redis.call('SET', KEYS[1], string.format('%.17g', new_tat), 'PX', math.ceil((new_tat - now) * 1000) + 1000)
return '0'
"""

LEASE_LUA = """
local now = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local expires = tonumber(ARGV[4])
if redis.call('ZSCORE', KEYS[1], ARGV[3]) then
  redis.call('ZADD', KEYS[1], expires, ARGV[3])
  return 1
end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], expires, ARGV[3])
redis.call('PEXPIRE', KEYS[1], math.ceil((expires - now) * 1000) + 1000)
if KEYS[2] then  -- a group of leases a process holds (released at once when it ends)
  redis.call('SADD', KEYS[2], KEYS[1])
  redis.call('SADD', KEYS[3], ARGV[5])
end
return 1
"""

RELEASE_GROUPS_LUA = """
local groups = {ARGV[2]}
if ARGV[2] == '*' then groups = redis.call('SMEMBERS', KEYS[1]) end
local n = 0
for _, g in ipairs(groups) do
  local gk = ARGV[3] .. g
  local prefix = ARGV[1] .. g .. '.'
  for _, k in ipairs(redis.call('SMEMBERS', gk)) do
    for _, m in ipairs(redis.call('ZRANGE', k, 0, -1)) do
      if string.sub(m, 1, #prefix) == prefix then n = n + redis.call('ZREM', k, m) end
    end
  end
  redis.call('DEL', gk)
  redis.call('SREM', KEYS[1], g)
end
return n
"""

REFRESH_LUA = """
local n = 0
for i = 2, #ARGV do
  n = n + redis.call('ZADD', KEYS[i - 1], 'XX', 'CH', ARGV[1], ARGV[i])
end
return n
"""

GREYLIST_LUA = """
local now = tonumber(ARGV[1])
local delay = tonumber(ARGV[2])
local expire = tonumber(ARGV[3])
local lifetime = tonumber(ARGV[4])
local first = tonumber(redis.call('HGET', KEYS[1], 'first'))
local pass_until = tonumber(redis.call('HGET', KEYS[1], 'pass') or '0')
local wait = 0
if first and pass_until >= now then
  pass_until = now + lifetime
else
  if (not first) or now - first > expire then first = now; pass_until = 0 end
  if now - first >= delay then pass_until = now + lifetime else wait = delay - (now - first) end
end
redis.call('HSET', KEYS[1], 'first', string.format('%.17g', first), 'pass', string.format('%.17g', pass_until))
local keep = math.max(pass_until, first + expire) - now
redis.call('PEXPIRE', KEYS[1], math.ceil(keep * 1000) + 1000)
return string.format('%.17g', wait)
"""

QUOTA_LUA = """
local out = {1}
for i = 1, #KEYS do
  local count = tonumber(redis.call('GET', KEYS[i]) or '0')
  out[i + 1] = count
  local cap = tonumber(ARGV[i + 1])
  if cap >= 0 and count + 1 > cap then out[1] = 0 end
end
if out[1] == 0 then return out end
for i = 1, #KEYS do
  out[i + 1] = redis.call('INCR', KEYS[i])
  redis.call('PEXPIRE', KEYS[i], ARGV[1])
end
return out
"""

QUOTA_TTL = 2 * 86400.0  # a daily counter outlives its day
MAX_QUOTA_KEYS = 100_000  # counters remembered per node (last seen, used while away)
MAX_RECORDS = 10_000  # records one table may hold (pauses per destination, suspensions)
MAX_RECORD = 4096  # octets of one record's JSON

RECORD_LUA = """
if ARGV[1] == 'put' then redis.call('HSET', KEYS[1], ARGV[2], ARGV[3]) else redis.call('HDEL', KEYS[1], ARGV[2]) end
redis.call('PUBLISH', ARGV[4], ARGV[5])
return 1
"""

CHANNEL = PREFIX + "records"  # a message per change of a record: {"table": ..., "node": ..., "origin": ...}

SCRIPTS = {"gcra": GCRA_LUA, "record": RECORD_LUA, "lease": LEASE_LUA, "refresh": REFRESH_LUA, "greylist": GREYLIST_LUA, "quota": QUOTA_LUA,
           "release_groups": RELEASE_GROUPS_LUA}


def divided(limit: int, nodes: int) -> int:
    """A node's share of a cluster-wide cap while it cannot reach the shared state (at least 1)."""
    return max(1, limit // max(1, nodes))


@implementer(IClusterState)
class LocalClusterState:
    """This node alone: rates, leases and greylisting in process; every answer already fired."""

    def __init__(self, clock: Any, node: str | None = None, max_keys: int = 1_000_000) -> None:
        self.clock = clock
        self.node = node or socket.gethostname()
        self.shared = False
        self.switches = 0
        self.memory = MemoryInboundState(clock, max_keys=max_keys)
        self.leases: dict[str, dict[str, float]] = {}
        self.groups: set[str] = set()
        self.quotas: dict[str, int] = {}

    def nodes_alive(self) -> int:
        return 1

    def take(self, name: str, key: str, rate: Rate) -> defer.Deferred[Any]:
        return defer.succeed(self.memory.take(name, key, rate))

    def acquire_lease(self, key: str, limit: int, lease: str, ttl: float, group: str | None = None) -> defer.Deferred[Any]:
        now = self.clock.seconds()
        held = {m: t for m, t in self.leases.get(key, {}).items() if t > now}
        if group is not None:
            self.groups.add(group)
        if lease not in held and len(held) >= limit:
            self.leases[key] = held
            return defer.succeed(False)
        held[lease] = now + ttl
        self.leases[key] = held
        return defer.succeed(True)

    def refresh_leases(self, leases: list[tuple[str, str]], ttl: float) -> defer.Deferred[Any]:
        until = self.clock.seconds() + ttl
        for key, lease in leases:
            if lease in self.leases.get(key, {}):
                self.leases[key][lease] = until
        return defer.succeed(None)

    def release_lease(self, key: str, lease: str) -> defer.Deferred[Any]:
        held = self.leases.get(key)
        if held is not None:
            held.pop(lease, None)
            if not held:
                del self.leases[key]
        return defer.succeed(None)

    def release_group(self, group: str) -> defer.Deferred[Any]:
        prefixes = tuple(g + "." for g in (self.groups if group == "*" else {group}))
        self.groups -= {p[:-1] for p in prefixes}
        for key in list(self.leases):
            held = self.leases[key]
            for lease in [m for m in held if m.startswith(prefixes)]:
                del held[lease]
            if not held:
                del self.leases[key]
        return defer.succeed(None)

    def greylist(self, triple: tuple[str, str, str], delay: float, expire: float, lifetime: float) -> defer.Deferred[Any]:
        return defer.succeed(self.memory.greylist(triple, delay, expire, lifetime))

    def take_quota(self, counters: list[tuple[str, int]]) -> defer.Deferred[Any]:
        if any(cap >= 0 and self.quotas.get(key, 0) + 1 > cap for key, cap in counters):
            return defer.succeed(False)
        for key, _ in counters:
            self.quotas[key] = self.quotas.get(key, 0) + 1
        if len(self.quotas) > MAX_QUOTA_KEYS:
            self.quotas.pop(next(iter(self.quotas)))
        return defer.succeed(True)

    def give_back_quota(self, keys: list[str]) -> defer.Deferred[Any]:
        for key in keys:
            if self.quotas.get(key, 0) > 0:
                self.quotas[key] -= 1
        return defer.succeed(None)

    def watch(self, table: str, on_records: Callable[[dict[str, dict[str, Any]]], Any]) -> None:
        pass  # a node alone: nobody else writes records

    def put_record(self, table: str, name: str, record: dict[str, Any], until: float) -> defer.Deferred[Any]:
        return defer.succeed(False)

    def delete_record(self, table: str, name: str) -> defer.Deferred[Any]:
        return defer.succeed(False)

    def start(self) -> defer.Deferred[Any]:
        return defer.succeed(None)

    def stop(self) -> defer.Deferred[Any]:
        return defer.succeed(None)


def _quota_key(counter: str) -> str:
    return PREFIX + "quota:" + _digest("quota", counter)


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _digest(name: str, key: str) -> str:
    """Keys of any length and content become bounded Redis keys."""
    return hashlib.sha1(f"{name}\0{key}".encode("utf-8", "surrogateescape")).hexdigest()


@implementer(IClusterState)
class RedisClusterState:
    """The cluster's state in Redis; this node's :class:`LocalClusterState` while Redis is away.

    ``connect`` is a zero-argument callable returning a Deferred of a txredisapi connection (so
    tests and ``tap`` choose TCP, unix socket or TLS); it is called again after a failure.
    """

    def __init__(
        self,
        clock: Any,
        connect: Callable[[], defer.Deferred[Any]],
        node: str | None = None,
        timeout: float = 0.5,
        heartbeat: float = 2.0,
        member: bool = True,
        subscriber: Opener | None = None,
    ) -> None:
        self.clock = clock
        self.connect = connect
        self.node = node or socket.gethostname()
        self.timeout = timeout
        self.heartbeat = heartbeat
        self.local = LocalClusterState(clock, self.node)
        self.shared = False
        self.switches = 0
        self.calls = 0  # Redis commands sent (scripts count one)
        self._alive = 1  # nodes seen alive at the last heartbeat that reached Redis
        self._conn: Any = None
        self._shas: dict[str, str] = {}
        self._beat: Any = None
        self._probing = False
        self._was_shared = False
        self.member = member  # False: a command-line tool speaking for the node, never counted alive
        self._watchers: dict[str, Callable[[dict[str, dict[str, Any]]], Any]] = {}
        self._quota_seen: dict[str, int] = {}  # each counter's cluster-wide count when last seen
        self._quota_away: dict[str, int] = {}  # counted here while Redis was away, pushed on return
        self._origin = uuid.uuid4().hex[:16]  # this process's changes (a tool shares the node's name)
        self._reading: dict[str, bool] = {}  # tables being read: True when changed again meanwhile
        # ``subscriber`` opens a Pub/Sub connection: record changes reach this node at once
        self.subscription = None if subscriber is None else Subscription(
            clock, subscriber, CHANNEL, self._record_changed, self._resubscribed, timeout=timeout * 4)

    # -- life -----------------------------------------------------------------------------

    def start(self) -> defer.Deferred[Any]:
        """Connect and beat; never fails (the node runs local until Redis answers)."""
        d = self._probe()
        self._schedule()
        if self.subscription is not None:
            self.subscription.start()
        return d

    def stop(self) -> defer.Deferred[Any]:
        if self._beat is not None and self._beat.active():
            self._beat.cancel()
        self._beat = None
        unsubscribed = self.subscription.stop() if self.subscription is not None else defer.succeed(None)
        conn, self._conn = self._conn, None
        if conn is None:
            return unsubscribed
        if not self.member:
            d = conn.disconnect()
        else:
            d = self._call(lambda c: c.zrem(PREFIX + "nodes", self.node), conn=conn)
            d.addBoth(lambda _: conn.disconnect())
        d.addErrback(lambda _: None)
        return defer.gatherResults([d, unsubscribed]).addCallback(lambda _: None)

    def _schedule(self) -> None:
        self._beat = self.clock.callLater(self.heartbeat, self._tick)

    def _tick(self) -> None:
        self._schedule()
        self.beat()

    def beat(self) -> defer.Deferred[Any]:
        """One heartbeat (shared) or one attempt to get back to Redis (local); never fails."""
        if self.shared:
            d = self._heartbeat()
            d.addCallback(lambda _: self._read_records())
            return d.addErrback(self._failed, "heartbeat")
        return self._probe()

    def nodes_alive(self) -> int:
        return self._alive

    @defer.inlineCallbacks
    def _heartbeat(self) -> Any:
        now = self.clock.seconds()
        key = PREFIX + "nodes"
        if self.member:
            yield self._call(lambda c: c.zadd(key, now, self.node))
        alive = yield self._call(lambda c: c.zcount(key, now - 3 * self.heartbeat, "+inf"))
        self._alive = max(1, int(alive))

    @defer.inlineCallbacks
    def _probe(self) -> Any:
        """Try Redis again: connect if needed, load the scripts, beat; go shared on success."""
        if self._probing:
            return None
        self._probing = True
        try:
            if self._conn is None:
                d = self.connect()
                d.addTimeout(self.timeout * 4, self.clock)
                self._conn = yield d
            for name, source in SCRIPTS.items():
                self._shas[name] = yield self._call(lambda c, s=source: c.script_load(s))
            yield self._heartbeat()
        except Exception as e:
            self._go_local(f"{type(e).__name__}: {e}"[:200])
        else:
            if not self.shared:
                self.shared = True
                self.switches += self._was_shared  # the first connection is no switch
                self._was_shared = True
                log.info("cluster state shared through Redis (node {node}, {alive} nodes alive)",
                         node=self.node, alive=self._alive, event="cluster_shared")  # fmt: skip
        finally:
            self._probing = False
        if self.shared:
            yield self._push_quota_away().addErrback(self._failed, "quota")
        if self.shared:
            yield self._read_records().addErrback(self._failed, "records")

    def _go_local(self, why: str) -> None:
        # A call that timed out may still be answered: drop the connection so that no later
        # call reads an earlier call's reply; the next probe connects afresh.
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.disconnect().addErrback(lambda _: None)
        if self.shared or not self._was_shared:
            self.switches += self.shared
            log.warn("cluster state unreachable, going local with limits divided by {alive} nodes: {why}",
                     alive=self._alive, why=why, node=self.node, event="cluster_fallback")  # fmt: skip
        self.shared = False

    def _failed(self, failure: Any, what: str) -> None:
        self._go_local(f"{what}: {failure.getErrorMessage()}"[:200])

    # -- calls ----------------------------------------------------------------------------

    def _call(self, command: Callable[..., defer.Deferred[Any]], conn: Any = None) -> defer.Deferred[Any]:
        conn = conn if conn is not None else self._conn
        if conn is None:
            return defer.fail(ConnectionError("not connected to Redis"))
        self.calls += 1
        d = defer.maybeDeferred(command, conn)
        d.addTimeout(self.timeout, self.clock)
        return d

    def _script(self, name: str, keys: list[str], args: list[Any]) -> defer.Deferred[Any]:
        return self._call(lambda c: c.evalsha(self._shas[name], keys=keys, args=[str(a) for a in args]))

    def _shared_or_local(self, shared: Callable[[], defer.Deferred[Any]], local: Callable[[], defer.Deferred[Any]],
                         what: str) -> defer.Deferred[Any]:  # fmt: skip
        if not self.shared:
            return local()

        def fallback(failure: Any) -> defer.Deferred[Any]:
            self._failed(failure, what)
            return local()

        return shared().addErrback(fallback)

    def command(self, *args: Any) -> defer.Deferred[Any]:
        """One raw Redis command within the timeout (fails while the node is local)."""
        if not self.shared:
            return defer.fail(ConnectionError("Redis unreachable: the node is local"))
        d = self._call(lambda c: c.execute_command(*args))
        def failed(failure: Any) -> Any:
            if type(failure.value).__name__ != "ResponseError":  # Redis answered: it is there
                self._failed(failure, str(args[0]))
            return failure

        return d.addErrback(failed)

    # -- daily quotas: warm-up caps ---------------------------------------------------------

    def take_quota(self, counters: list[tuple[str, int]]) -> defer.Deferred[Any]:
        """Deferred of True when every (counter, cap) pair has room for one more (cap < 0: no cap),
        and then each counter counts it; False otherwise. Counters live two days. While Redis is
        away each cap allows this node the remaining quota last seen, divided by the nodes alive."""

        def shared() -> defer.Deferred[Any]:
            keys = [_quota_key(k) for k, _ in counters]
            d = self._script("quota", keys, [int(QUOTA_TTL * 1000), *(cap for _, cap in counters)])
            return d.addCallback(seen)

        def seen(reply: list[Any]) -> bool:
            if len(self._quota_seen) > MAX_QUOTA_KEYS:
                self._quota_seen.clear()
            for (key, _), count in zip(counters, reply[1:], strict=False):
                self._quota_seen[key] = int(count)
            return bool(int(reply[0]))

        return self._shared_or_local(shared, lambda: defer.succeed(self._local_quota(counters)), "quota")

    def _local_quota(self, counters: list[tuple[str, int]]) -> bool:
        for key, cap in counters:
            if cap >= 0:
                share = max(0, cap - self._quota_seen.get(key, 0)) // max(1, self._alive)
                if self._quota_away.get(key, 0) + 1 > share:
                    return False
        if len(self._quota_away) < MAX_QUOTA_KEYS:
            for key, _ in counters:
                self._quota_away[key] = self._quota_away.get(key, 0) + 1
        return True

    def give_back_quota(self, keys: list[str]) -> defer.Deferred[Any]:
        """One taken by :meth:`take_quota` was not used (nothing was delivered)."""
        if not self.shared:
            for key in keys:
                if self._quota_away.get(key, 0) > 0:
                    self._quota_away[key] -= 1
            return defer.succeed(None)
        redis_keys = [_quota_key(key) for key in keys]
        d = defer.gatherResults([self._call(lambda c, k=k: c.decr(k)) for k in redis_keys], consumeErrors=True)
        return d.addCallback(lambda _: None).addErrback(self._failed, "quota")

    @defer.inlineCallbacks
    def _push_quota_away(self) -> Any:
        """What this node counted while Redis was away joins the cluster's counters."""
        while self._quota_away:
            key, n = next(iter(self._quota_away.items()))
            redis_key = _quota_key(key)
            if n > 0:
                yield self._call(lambda c, k=redis_key, by=n: c.incrby(k, by))
                yield self._call(lambda c, k=redis_key: c.expire(k, int(QUOTA_TTL)))
            self._quota_away.pop(key, None)

    # -- records: pauses, suspensions -------------------------------------------------------

    def watch(self, table: str, on_records: Callable[[dict[str, dict[str, Any]]], Any]) -> None:
        """Call ``on_records({name: record})`` with ``table``'s records in force each time the
        node reads them from Redis (on joining, on every heartbeat, on (re)subscribing and when
        another node publishes a change of the table); one watcher per table, a
        later call replaces it (a store opened again)."""
        self._watchers[table] = on_records

    def put_record(self, table: str, name: str, record: dict[str, Any], until: float) -> defer.Deferred[Any]:
        """Keep ``record`` under ``name`` in ``table`` until ``until`` (every node reads it); a
        Deferred of True once Redis has it, False when the node is local."""
        value = json.dumps({**record, "until": until}, sort_keys=True, default=str)
        if len(value) > MAX_RECORD:
            raise ValueError(f"a {table} record is over {MAX_RECORD} octets")
        return self._change_record("put", table, name, value)

    def delete_record(self, table: str, name: str) -> defer.Deferred[Any]:
        """Forget ``name`` in ``table``; a Deferred of True once Redis has done it."""
        return self._change_record("delete", table, name, "")

    def _change_record(self, op: str, table: str, name: str, value: str) -> defer.Deferred[Any]:
        """Store or delete a record and publish the change, in one script (a Deferred of True once done)."""
        if not self.shared:
            return defer.succeed(False)
        message = json.dumps({"table": table, "node": self.node, "origin": self._origin})
        d = self.command("EVALSHA", self._shas["record"], 1, PREFIX + table, op, name[:512], value, CHANNEL, message)
        return d.addCallbacks(lambda _: True, lambda _: False)

    def _record_changed(self, channel: str, message: str) -> None:
        """A message on the records channel: another node changed a table; read it if watched."""
        try:
            change = json.loads(message[:MAX_RECORD])
            table, origin = str(change["table"]), change.get("origin")
        except (ValueError, KeyError, TypeError):
            return
        if origin != self._origin and table in self._watchers and self.shared:
            self._read_table(table)

    @defer.inlineCallbacks
    def _resubscribed(self) -> Any:
        """Subscribed (again): Redis answers, so catch up with the changes published while nobody
        listened (a node gone local, or whose command connection died meanwhile, probes again)."""
        if self.shared:
            try:
                yield self._read_records()
                return
            except Exception as e:
                self._go_local(f"records: {type(e).__name__}: {e}"[:200])
        yield self._probe()

    def _read_table(self, table: str) -> None:
        """Read one table now, or once more after the read under way (changes coalesce)."""
        if table in self._reading:
            self._reading[table] = True
            return
        self._reading[table] = False

        def done(result: Any) -> Any:
            if self._reading.pop(table, False) and self.shared:
                self._read_table(table)
            return result

        self._read_records([table]).addBoth(done).addErrback(self._failed, "records")

    @defer.inlineCallbacks
    def _read_records(self, tables: list[str] | None = None) -> Any:
        for table in list(self._watchers) if tables is None else tables:
            on_records = self._watchers[table]
            key = PREFIX + table
            if (yield self._call(lambda c, k=key: c.hlen(k))) > MAX_RECORDS:
                log.warn("cluster table {table} holds over {most} records: not read", table=table, most=MAX_RECORDS,
                         event="cluster_records_full")  # fmt: skip
                continue
            raw = yield self._call(lambda c, k=key: c.hgetall(k))
            now = self.clock.seconds()
            records, lapsed = {}, []
            for name, value in (raw or {}).items():
                try:
                    record = json.loads(value)
                    if not isinstance(record, dict) or float(record["until"]) <= now:
                        raise ValueError("lapsed")
                except (ValueError, KeyError, TypeError):
                    lapsed.append(name)
                    continue
                records[_text(name)] = record
            if lapsed:
                yield self._call(lambda c, k=key, names=lapsed: c.hdel(k, names))
            try:
                on_records(records)
            except Exception:
                log.failure("applying the cluster's {table}", table=table)

    # -- the operations -------------------------------------------------------------------

    def take(self, name: str, key: str, rate: Rate) -> defer.Deferred[Any]:
        """0.0 if one event may happen now (recorded cluster-wide), else seconds to wait."""
        if name.startswith(LOCAL_PREFIX):
            return self.local.take(name, key, rate)
        return self._shared_or_local(
            lambda: self._script("gcra", [PREFIX + "gcra:" + _digest(name, key)],
                                 [repr(self.clock.seconds()), repr(rate.interval), rate.burst, 1]).addCallback(float),
            lambda: self.local.take(name, key, rate.scaled(1 / self._alive)),
            "rate")  # fmt: skip

    def acquire_lease(self, key: str, limit: int, lease: str, ttl: float, group: str | None = None) -> defer.Deferred[Any]:
        """True if ``lease`` holds one of ``limit`` slots of ``key`` (for ``ttl`` unless refreshed).
        ``group`` (a lease then starts ``group + "."``): the leases one process holds, which
        :meth:`release_group` gives back at once."""
        if key.startswith(LOCAL_PREFIX):
            return self.local.acquire_lease(key, limit, lease, ttl)
        now = self.clock.seconds()
        keys = [PREFIX + "lease:" + _digest("lease", key)]
        args = [repr(now), limit, f"{self.node}/{lease}", repr(now + ttl)]
        if group is not None:
            keys += [self._group_key(group), PREFIX + "groups:" + self.node]
            args.append(group)
        return self._shared_or_local(
            lambda: self._script("lease", keys, args).addCallback(bool),
            lambda: self.local.acquire_lease(key, divided(limit, self._alive), lease, ttl),
            "lease")  # fmt: skip

    def _group_key(self, group: str) -> str:
        return f"{PREFIX}group:{self.node}/{group}"

    def release_group(self, group: str) -> defer.Deferred[Any]:
        """Give back every lease of ``group`` on this node ("*": of every group), as when the
        process holding them has ended or the node starts again."""
        self.local.release_group(group)
        if not self.shared:
            return defer.succeed(None)
        d = self._script("release_groups", [PREFIX + "groups:" + self.node], [f"{self.node}/", group, self._group_key("")])
        return d.addCallback(lambda _: None).addErrback(self._failed, "lease release")

    def refresh_leases(self, leases: list[tuple[str, str]], ttl: float) -> defer.Deferred[Any]:
        """Push the expiry of these (key, lease) pairs ``ttl`` ahead (the connections still live)."""
        self.local.refresh_leases(leases, ttl)
        shared = [(k, lease) for k, lease in leases if not k.startswith(LOCAL_PREFIX)]
        if not shared or not self.shared:
            return defer.succeed(None)
        keys = [PREFIX + "lease:" + _digest("lease", k) for k, _ in shared]
        members = [f"{self.node}/{lease}" for _, lease in shared]
        d = self._script("refresh", keys, [repr(self.clock.seconds() + ttl), *members])
        return d.addCallback(lambda _: None).addErrback(self._failed, "lease refresh")

    def release_lease(self, key: str, lease: str) -> defer.Deferred[Any]:
        self.local.release_lease(key, lease)
        if key.startswith(LOCAL_PREFIX) or not self.shared:
            return defer.succeed(None)
        d = self._call(lambda c: c.zrem(PREFIX + "lease:" + _digest("lease", key), f"{self.node}/{lease}"))
        return d.addCallback(lambda _: None).addErrback(self._failed, "lease release")

    def greylist(self, triple: tuple[str, str, str], delay: float, expire: float, lifetime: float) -> defer.Deferred[Any]:
        return self._shared_or_local(
            lambda: self._script("greylist", [PREFIX + "grey:" + _digest("grey", "\0".join(triple))],
                                 [repr(self.clock.seconds()), repr(delay), repr(expire), repr(lifetime)]
                                 ).addCallback(float),
            lambda: self.local.greylist(triple, delay, expire, lifetime),
            "greylist")  # fmt: skip


class LeaseKeeper:
    """The leases one process holds in the cluster (``group``: released together), refreshed
    every third of ``ttl`` while held, so that they lapse within ``ttl`` once the process dies."""

    def __init__(self, cluster: Any, clock: Any, ttl: float, group: str | None = None) -> None:
        self.cluster = cluster
        self.clock = clock
        self.ttl = ttl
        self.group = group
        self.held: dict[str, list[str]] = {}
        self._serial = 0
        self._refresher: Any = None

    def acquire(self, key: str, limit: int) -> defer.Deferred[Any]:
        """A Deferred of True when one more slot of ``key`` (of ``limit``) is held here."""
        self._serial += 1
        lease = f"{self.group or f'{id(self):x}'}.{self._serial}"  # unique in this process

        def got(ok: bool) -> bool:
            if ok:
                self.held.setdefault(key, []).append(lease)
                self._start()
            return ok

        return cast("defer.Deferred[Any]", self.cluster.acquire_lease(key, limit, lease, self.ttl, self.group).addCallback(got))

    def release(self, key: str) -> defer.Deferred[Any]:
        """Give one slot of ``key`` held here back (none held: nothing)."""
        leases = self.held.get(key)
        if not leases:
            return defer.succeed(None)
        lease = leases.pop()
        if not leases:
            del self.held[key]
        return cast("defer.Deferred[Any]", self.cluster.release_lease(key, lease))

    def _start(self) -> None:
        if self._refresher is None:
            self._refresher = task.LoopingCall(self._refresh)
            self._refresher.clock = self.clock
            self._refresher.start(self.ttl / 3, now=False).addErrback(lambda f: log.failure("lease refresh", f))

    def _refresh(self) -> Any:
        held = [(key, lease) for key, leases in self.held.items() for lease in leases]
        return self.cluster.refresh_leases(held, self.ttl) if held else None

    def stop(self) -> None:
        if self._refresher is not None and self._refresher.running:
            self._refresher.stop()
        self._refresher = None


@implementer(IInboundState)
class ClusterInboundState:
    """:class:`IInboundState` of a cluster: per-client connection counts are leases (a node that
    dies frees its clients' slots within ``lease_ttl``), rates and greylisting the cluster's GCRA
    and greylisting. Every answer is a Deferred; away from Redis the node answers alone, with the
    limits divided by the nodes alive and greylisting of its own."""

    def __init__(self, cluster: Any, clock: Any, lease_ttl: float = 30.0, owner: int | None = None) -> None:
        self.cluster = cluster
        self.owner = os.getpid() if owner is None else owner
        self.leases = LeaseKeeper(cluster, clock, lease_ttl, group=f"inbound{self.owner}")

    def acquire_connection(self, key: str, limit: int) -> defer.Deferred[Any]:
        return self.leases.acquire("client:" + key, limit)

    def release_connection(self, key: str) -> defer.Deferred[Any]:
        return self.leases.release("client:" + key)

    def take(self, name: str, key: str, rate: Rate) -> defer.Deferred[Any]:
        return cast("defer.Deferred[Any]", self.cluster.take("inbound:" + name, key, rate))

    def greylist(self, triple: tuple[str, str, str], delay: float, expire: float, lifetime: float) -> defer.Deferred[Any]:
        return cast("defer.Deferred[Any]", self.cluster.greylist(triple, delay, expire, lifetime))

    def release_owner(self, owner: int) -> defer.Deferred[Any]:
        return cast("defer.Deferred[Any]", self.cluster.release_group(f"inbound{owner}"))

    def clear_connections(self) -> defer.Deferred[Any]:
        self.leases.held.clear()
        return cast("defer.Deferred[Any]", self.cluster.release_group("*"))

    def close(self) -> None:
        self.leases.stop()


def redis_connector(url: str, password: str | None = None, timeout: float = 0.5) -> Callable[[], defer.Deferred[Any]]:
    """A ``connect`` for :class:`RedisClusterState` from ``redis://``, ``rediss://`` or ``unix:/path``."""
    import txredisapi

    if url.startswith("unix:"):
        path = url[len("unix:"):]
        return lambda: txredisapi.UnixConnection(path, reconnect=False, password=password, replyTimeout=timeout)
    parts = urlsplit(url)
    db = int(parts.path.strip("/") or 0)
    tls = parts.scheme == "rediss"
    password = password if password is not None else parts.password
    host, port = parts.hostname or "127.0.0.1", parts.port or 6379
    return lambda: txredisapi.Connection(host, port, dbid=db, reconnect=False, password=password,
                                         ssl_context_factory=tls, connectTimeout=timeout * 4,
                                         replyTimeout=timeout)  # fmt: skip


def redis_subscriber(url: str, password: str | None = None, timeout: float = 0.5) -> Opener:
    """An ``open`` for :class:`pymta.state.channel.Subscription`: a Pub/Sub connection to ``url``
    (as :func:`redis_connector`'s), calling ``on_message(channel, message)`` per message and
    ``on_lost()`` when the connection ends."""
    import txredisapi
    from twisted.internet import reactor
    from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint, wrapClientTLS
    from twisted.internet.ssl import optionsForClientTLS

    class Protocol(txredisapi.SubscriberProtocol):  # type: ignore[misc]  # txredisapi ships no types
        def messageReceived(self, pattern: Any, channel: Any, message: Any) -> None:
            self.factory.on_message(_text(channel), _text(message))

        def connectionLost(self, why: Any) -> None:
            super().connectionLost(why)
            self.factory.on_lost()

    class Factory(txredisapi.SubscriberFactory):  # type: ignore[misc]  # txredisapi ships no types
        protocol = Protocol

        def __init__(self, on_message: Callable[[str, str], Any], on_lost: Callable[[], Any]) -> None:
            txredisapi.RedisFactory.__init__(self, None, None, 1, password=password, replyTimeout=timeout)
            self.reconnect = False  # the Subscription reconnects, with its own backoff
            self.on_message, self.on_lost = on_message, on_lost

    if url.startswith("unix:"):
        endpoint: Any = UNIXClientEndpoint(reactor, url[len("unix:"):], timeout=timeout * 4)
    else:
        parts = urlsplit(url)
        password = password if password is not None else parts.password
        host = parts.hostname or "127.0.0.1"
        endpoint = HostnameEndpoint(reactor, host, parts.port or 6379, timeout=timeout * 4)
        if parts.scheme == "rediss":
            endpoint = wrapClientTLS(optionsForClientTLS(host), endpoint)

    def open(on_message: Callable[[str, str], Any], on_lost: Callable[[], Any]) -> defer.Deferred[Any]:
        factory = Factory(on_message, on_lost)
        factory.startConnecting(endpoint)
        return cast("defer.Deferred[Any]", factory.deferred)

    return open


def read_password(path: str | None) -> str | None:
    """The first line of ``redis_password_file`` (None without one)."""
    if path is None:
        return None
    with open(path, encoding="utf-8") as f:
        return f.readline().rstrip("\r\n") or None


def make_cluster_state(config: Any, clock: Any, member: bool = True) -> LocalClusterState | RedisClusterState:
    """The backend ``[cluster]`` names (``member=False``: a tool speaking for the node, not a node)."""
    c = config.cluster
    node = c.node or socket.gethostname()
    if c.backend == "local":
        return LocalClusterState(clock, node)
    password = read_password(c.redis_password_file)
    connect = redis_connector(c.redis, password, c.timeout)
    subscriber = redis_subscriber(c.redis, password, c.timeout) if member else None
    return RedisClusterState(clock, connect, node=node, timeout=c.timeout, heartbeat=c.heartbeat, member=member,
                             subscriber=subscriber)  # fmt: skip


__all__ = ["ClusterInboundState", "LeaseKeeper", "LocalClusterState", "RedisClusterState", "divided",
           "make_cluster_state", "redis_subscriber"]

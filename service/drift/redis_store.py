"""Drift streams shared by every replica in Valkey or Redis (`OODSERVE_DRIFT_STORE=redis://...`).

One ordered state per (model, stream) for the whole deployment, so its guarantee is that of one process:
P(any false alarm on a clean segment) <= delta (Ville), however many replicas feed it (Vovk, Gammerman and
Shafer 2005, ch. 7; Vovk 2021 "Testing randomness online"; Vovk et al. 2021 on conformal Shiryaev-Roberts).

Keys (prefix P, member = model + "\\n" + stream):
- `P:cal:<model>:<fingerprint>`: sorted set of the model's fused calibration scores (M,), loaded by the first
  replica that needs it and expiring after a day (then loaded again while the bundle is still served).
- `P:ref:<member>`: sorted set of the stream's scores since its restart (n,) (member = the input's index).
  The conformal p-value's counts come from ZCOUNT on both sets: O(log(M + n)) per input.
- `P:state:<member>`: hash of the segment: inputs, the K log components of the power martingale and of the
  Shiryaev-Roberts statistics (field `c`, 2K packed doubles, read by the script only), their current logs, the
  martingale's maximum, the alarm latches and totals, and the input (1-based, since the restart) at which each
  alarm latched (`alarm_at`, `change_alarm_at`; 0 = none).
- `P:streams`: sorted set of members by last use (a logical clock): least recently used streams are evicted
  across all replicas beyond `max_streams`. `P:counters`: the clock, evictions and restarts by reason.
- `P:applied:<replica>`: the last call of that replica applied, so a retried call (a timeout whose script did
  run) is never counted twice.

A request batch is one Lua script call (`FEED_SCRIPT`), atomic in the store, so replicas never interleave inside
a half-update. The tie-breaking draws tau ~ U(0, 1) come from the replica's own generator (seeded from OS
entropy and the replica's id) and travel with the scores: each input's tau is independent of every score and
of the order the store applies batches in, which is what the smoothed p-values need.

The request path never touches the network: `observe` appends to a bounded buffer, and one worker thread per
replica sends the buffered batches in order, each call with a short timeout (`timeout_ms`). While the store is
slow or down the buffer holds the inputs (up to `buffer_inputs`) and the store reports `unavailable`; once
inputs have to be dropped, their stream restarts (reason `gap`) on its next call, since a stream with a hole
is no longer the stream the test is about. A store that lost its data (restarted without persistence) starts
every stream afresh.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from oodserve.drift.conformal_martingale import DEFAULT_EPSILONS
from oodserve.drift.monitor import LOG10, DriftSettings, DriftSnapshot, StreamReport
from oodserve.drift.store import StoreOptions
from oodserve.scoring.conformal import as_non_conformity

logger = logging.getLogger("oodserve.drift")

FEED_SCRIPT = r"""
-- KEYS: 1 state hash, 2 stream scores, 3 calibration scores, 4 streams by last use, 5 counters, 6 applied marker
-- ARGV: 1 call id, 2 calibration fingerprint, 3 max inputs per segment, 4 max streams, 5 restart reason ('' = none,
--       'gap', or 'admin': restart an existing stream, feed nothing), 6 now (unix s), 7 log martingale threshold,
--       8 log change threshold, 9 stream member (model \n stream), 10 key prefix,
--       then (score, tau) pairs
local state, ref, cal, lru, counters, applied = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local call_id = tonumber(ARGV[1])
if call_id <= tonumber(redis.call('GET', applied) or '0') then return {'duplicate', 0} end
local fp, max_inputs, max_streams, reason = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
local now, thr_m, thr_c, member, prefix = ARGV[6], tonumber(ARGV[7]), tonumber(ARGV[8]), ARGV[9], ARGV[10]
local eps = {EPSILONS}  -- the betting grid, written in when the script is built
local K = #eps
local first = 11
local inputs = (#ARGV - first + 1) / 2
local model = string.match(member, '^(.-)\n')
local exists = redis.call('EXISTS', state) == 1
if reason == 'admin' and not exists then return {'absent', 0} end
if inputs > 0 and redis.call('EXISTS', cal) == 0 then return {'calibration_missing', 0} end

local function fmt(x) return string.format('%.17g', x) end
local leps = {}
for k = 1, K do leps[k] = math.log(eps[k]) end
local logK = math.log(K)
local components = '<' .. string.rep('d', 2 * K)  -- the 2K log components, packed as doubles in field c
local function lse(values)
  local top = -math.huge
  for k = 1, K do if values[k] > top then top = values[k] end end
  if top == -math.huge then return top end
  local total = 0
  for k = 1, K do total = total + math.exp(values[k] - top) end
  return top + math.log(total)
end

local st = {}
if exists then
  local flat = redis.call('HGETALL', state)
  for i = 1, #flat, 2 do st[flat[i]] = flat[i + 1] end
end
local n, alarm, change_alarm, alarms_m, alarms_c, mmax, since, alarm_at, change_alarm_at
local m, s = {}, {}
local function fresh()
  n, alarm, change_alarm, mmax, since, alarm_at, change_alarm_at = 0, 0, 0, 0, now, 0, 0
  for k = 1, K do m[k] = 0; s[k] = -math.huge end
  redis.call('DEL', ref)
end
local function restart(why)
  fresh()
  redis.call('HINCRBY', counters, 'restart\n' .. model .. '\n' .. why, 1)
end
if exists then
  n, alarm, change_alarm = tonumber(st.n), tonumber(st.alarm), tonumber(st.change_alarm)
  alarms_m, alarms_c, mmax, since = tonumber(st.alarms_m), tonumber(st.alarms_c), tonumber(st.mmax), st.since
  alarm_at, change_alarm_at = tonumber(st.alarm_at), tonumber(st.change_alarm_at)
  local packed = {struct.unpack(components, st.c)}
  for k = 1, K do m[k] = packed[k]; s[k] = packed[K + k] end
  if reason == 'admin' then
    fp = st.fp
    restart('admin')
  elseif st.fp ~= fp then
    restart('reload')
  elseif reason ~= '' then
    restart(reason)
  end
else
  alarms_m, alarms_c = 0, 0
  fresh()
end

local m_size = redis.call('ZCARD', cal)
local lm, ls = lse(m) - logK, lse(s) - logK
for i = 0, inputs - 1 do
  if n >= max_inputs then restart('bound') end
  local score, tau = ARGV[first + 2 * i], tonumber(ARGV[first + 2 * i + 1])
  local above = '(' .. score
  local greater = redis.call('ZCOUNT', cal, above, '+inf') + redis.call('ZCOUNT', ref, above, '+inf')
  local at_least = redis.call('ZCOUNT', cal, score, '+inf') + redis.call('ZCOUNT', ref, score, '+inf')
  local p = (greater + tau * (at_least - greater + 1)) / (m_size + n + 1)
  redis.call('ZADD', ref, score, n)
  n = n + 1
  local log_p = math.log(math.min(math.max(p, 1e-300), 1.0))
  for k = 1, K do
    m[k] = m[k] + leps[k] + (eps[k] - 1.0) * log_p
    local c = s[k]
    if c > 0 then c = c + math.log(1 + math.exp(-c)) else c = math.log(1 + math.exp(c)) end
    s[k] = c + leps[k] + (eps[k] - 1.0) * log_p
  end
  lm, ls = lse(m) - logK, lse(s) - logK
  if lm > mmax then mmax = lm end
  if alarm == 0 and lm >= thr_m then alarm = 1; alarms_m = alarms_m + 1; alarm_at = n end
  if change_alarm == 0 and ls >= thr_c then change_alarm = 1; alarms_c = alarms_c + 1; change_alarm_at = n end
end

local fields = {'fp', fp, 'n', n, 'since', since, 'alarm', alarm, 'change_alarm', change_alarm, 'alarms_m', alarms_m,
                'alarms_c', alarms_c, 'mmax', fmt(mmax), 'logm', fmt(lm), 'logs', fmt(ls), 'alarm_at', alarm_at,
                'change_alarm_at', change_alarm_at}
local all = {}
for k = 1, K do all[k] = m[k]; all[K + k] = s[k] end
fields[#fields + 1] = 'c'; fields[#fields + 1] = struct.pack(components, unpack(all))
redis.call('HSET', state, unpack(fields))
if reason ~= 'admin' then
  redis.call('ZADD', lru, redis.call('HINCRBY', counters, 'clock', 1), member)
  while redis.call('ZCARD', lru) > max_streams do
    local victim = redis.call('ZPOPMIN', lru)[1]
    redis.call('DEL', prefix .. ':state:' .. victim, prefix .. ':ref:' .. victim)
    redis.call('HINCRBY', counters, 'evicted\n' .. string.match(victim, '^(.-)\n'), 1)
  end
end
redis.call('SET', applied, call_id, 'EX', 86400)
return {'ok', n}
"""

def feed_script(epsilons: Sequence[float]) -> str:
    """FEED_SCRIPT with the betting grid written in (its text, and so its SHA, fixes the grid)."""
    return FEED_SCRIPT.replace("{EPSILONS}", "{" + ", ".join(repr(float(e)) for e in epsilons) + "}")


MAX_CALL_INPUTS = 256
"""Most inputs one script call carries: the store runs nothing else meanwhile, so a call stays a few milliseconds,
well inside the timeout."""
CALIBRATION_CHUNK = 5000
CALIBRATION_TTL_SECONDS = 86_400
BACKOFF_SECONDS = (0.05, 0.1, 0.2, 0.5, 1.0)
CLOSE_FLUSH_SECONDS = 2.0


@dataclass
class _Batch:
    model: str
    stream: str
    calibration: np.ndarray
    fingerprint: str
    scores: list[float]
    taus: list[float]


@dataclass
class _Call:
    """One script call: consecutive batches of one stream, sent (and retried) in order under one id."""

    call_id: int
    model: str
    stream: str
    calibration: np.ndarray
    fingerprint: str
    restart: str
    values: list[float | str] = field(default_factory=list)


def stream_member(model: str, stream: str) -> str:
    return f"{model}\n{stream}"


class RedisDriftStore:
    """The drift tests of every (model, stream) in one shared Valkey/Redis; see the module docstring."""

    def __init__(self, settings: DriftSettings, options: StoreOptions, replica_id: str | None = None) -> None:
        self.settings = settings
        self.options = options
        self.replica_id = replica_id or f"{os.uname().nodename}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        timeout = options.timeout_ms / 1000.0
        self._client = redis.Redis.from_url(
            options.url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
            decode_responses=True,
        )
        if options.password is not None:  # from a Secret: wins over a password in the URL (which from_url would prefer)
            self._client.connection_pool.connection_kwargs["password"] = options.password
        self._feed = self._client.register_script(feed_script(DEFAULT_EPSILONS))
        entropy = np.random.SeedSequence(entropy=None if settings.seed is None else settings.seed,
                                         spawn_key=(int.from_bytes(hashlib.blake2b(self.replica_id.encode(), digest_size=8).digest()),))
        self._rng = np.random.default_rng(entropy)
        self._fingerprints: dict[int, tuple[np.ndarray, str]] = {}
        self._lock = threading.Condition()
        self._pending: deque[_Batch] = deque()
        self._pending_inputs = 0
        self._in_flight: deque[_Call] = deque()
        self._in_flight_inputs = 0
        self._gaps: set[tuple[str, str]] = set()
        self._next_call = 1
        self._admin_calls = 0
        self._closed = False
        self.available = True
        self.last_error: str | None = None
        self.dropped_inputs = 0
        self.errors = 0
        self.sent_inputs = 0
        self.store_seconds = 0.0
        """Wall time of the successful script calls (the cost the store adds, measured by the worker)."""
        self._worker = threading.Thread(target=self._run, name="oodserve-drift-store", daemon=True)
        self._worker.start()

    # The request path: no network, a bounded buffer.

    def _fingerprint(self, calibration: np.ndarray) -> str:
        known = self._fingerprints.get(id(calibration))
        if known is not None and known[0] is calibration:
            return known[1]
        digest = hashlib.blake2b(np.ascontiguousarray(calibration, dtype=np.float64).tobytes(), digest_size=12).hexdigest()
        if len(self._fingerprints) > 64:
            self._fingerprints.clear()
        self._fingerprints[id(calibration)] = (calibration, digest)  # the array is kept, so its id is not reused
        return digest

    def observe(self, model: str, stream: str, calibration: np.ndarray, fused_scores: np.ndarray) -> None:
        """Queue a request's fused statistics (N,) with their tie-breaking draws; returns at once."""
        if len(fused_scores) == 0:
            return
        scores = as_non_conformity(fused_scores).tolist()
        with self._lock:
            batch = _Batch(model, stream, calibration, self._fingerprint(calibration), scores, self._rng.random(len(scores)).tolist())
            self._pending.append(batch)
            self._pending_inputs += len(scores)
            while self._pending_inputs + self._in_flight_inputs > self.options.buffer_inputs:
                self._drop_oldest()
            self._lock.notify()

    def _drop_oldest(self) -> None:
        """Drop the oldest held inputs (a call not yet applied, else a batch) and mark their stream: it restarts
        (reason `gap`) with its next call, since the test's stream would otherwise have a hole."""
        if self._in_flight:
            call = self._in_flight.popleft()
            count, key = len(call.values) // 2, (call.model, call.stream)
            self._in_flight_inputs -= count
        else:
            batch = self._pending.popleft()
            count, key = len(batch.scores), (batch.model, batch.stream)
            self._pending_inputs -= count
        self.dropped_inputs += count
        self._gaps.add(key)

    # The worker: in-order calls, each retried until it is applied (or dropped with its stream marked).

    def _form_calls(self) -> None:
        """Move up to MAX_CALL_INPUTS pending inputs into calls, one per stream (its batches in order)."""
        calls: dict[tuple[str, str, str], _Call] = {}
        taken = 0
        while self._pending and taken < MAX_CALL_INPUTS:
            batch = self._pending.popleft()
            self._pending_inputs -= len(batch.scores)
            taken += len(batch.scores)
            key = (batch.model, batch.stream, batch.fingerprint)
            call = calls.get(key)
            if call is None:
                gap = (batch.model, batch.stream) in self._gaps
                self._gaps.discard((batch.model, batch.stream))
                call = calls[key] = _Call(0, batch.model, batch.stream, batch.calibration, batch.fingerprint, "gap" if gap else "")
            for score, tau in zip(batch.scores, batch.taus, strict=True):
                call.values += (score, repr(tau))
        for call in calls.values():
            call.call_id = self._next_call
            self._next_call += 1
            self._in_flight.append(call)
        self._in_flight_inputs += taken

    def _run(self) -> None:
        failures = 0
        while True:
            with self._lock:
                while not self._closed and not self._pending and not self._in_flight:
                    self._lock.wait()
                if self._closed and not self._pending and not self._in_flight:
                    return
                if not self._in_flight:
                    self._form_calls()
                call = self._in_flight[0]
            try:
                self._send(call)
            except Exception as error:  # noqa: BLE001 - the worker must outlive any failure; each is reported
                if not isinstance(error, redis.RedisError):
                    logger.exception("drift store call failed unexpectedly")
                failures += 1
                self._mark_unavailable(error)
                with self._lock:
                    if self._closed:
                        return  # close() gave up on the store: what is left is lost with the process
                    self._lock.wait(BACKOFF_SECONDS[min(failures, len(BACKOFF_SECONDS)) - 1])
                continue
            failures = 0
            with self._lock:
                if self._in_flight and self._in_flight[0] is call:  # else dropped meanwhile (and counted as lost)
                    self._in_flight.popleft()
                    self._in_flight_inputs -= len(call.values) // 2
                self.sent_inputs += len(call.values) // 2
                if not self.available:
                    logger.warning("drift store %s is reachable again", self._where())
                self.available, self.last_error = True, None

    def _mark_unavailable(self, error: Exception) -> None:
        with self._lock:
            self.errors += 1
            if self.available:
                logger.warning("drift store %s unavailable (%s): holding up to %d inputs", self._where(), error, self.options.buffer_inputs)
            self.available, self.last_error = False, f"{type(error).__name__}: {error}"

    def _where(self) -> str:
        kwargs = self._client.connection_pool.connection_kwargs
        return str(kwargs.get("path") or f"{kwargs.get('host')}:{kwargs.get('port')}")

    def _keys(self, model: str, stream: str, fingerprint: str, caller: str = "feed") -> list[str]:
        """The script's keys; `caller` separates the applied markers of the worker's ordered calls and of admin resets."""
        prefix, member = self.options.prefix, stream_member(model, stream)
        return [f"{prefix}:state:{member}", f"{prefix}:ref:{member}", f"{prefix}:cal:{model}:{fingerprint}", f"{prefix}:streams",
                f"{prefix}:counters", f"{prefix}:applied:{self.replica_id}:{caller}"]

    def _arguments(self, call_id: int, fingerprint: str, restart: str, member: str) -> list[Any]:
        settings = self.settings
        return [call_id, fingerprint, settings.max_stream_inputs, settings.max_streams, restart, repr(time.time()),
                repr(-math.log(settings.delta)), repr(math.log(settings.change_threshold)), member, self.options.prefix]

    def _send(self, call: _Call) -> None:
        keys = self._keys(call.model, call.stream, call.fingerprint)
        arguments = [*self._arguments(call.call_id, call.fingerprint, call.restart, stream_member(call.model, call.stream)), *call.values]
        for attempt in range(2):
            began = time.perf_counter()
            status, _ = self._feed(keys=keys, args=arguments)
            if status != "calibration_missing":
                self.store_seconds += time.perf_counter() - began
                return
            if attempt == 0:
                self._load_calibration(keys[2], call.calibration)
        raise redis.ResponseError("the calibration set vanished twice in a row (is the store evicting keys?)")

    def _load_calibration(self, key: str, calibration: np.ndarray) -> None:
        """The model's calibration scores into a temporary set, renamed into place at once (never seen half-loaded)."""
        values = as_non_conformity(calibration).tolist()
        temporary = f"{key}:loading:{self.replica_id}"
        self._client.delete(temporary)
        for start in range(0, len(values), CALIBRATION_CHUNK):
            self._client.zadd(temporary, {f"c{start + i}": value for i, value in enumerate(values[start : start + CALIBRATION_CHUNK])})
        self._client.rename(temporary, key)
        # a bundle no longer served leaves no set behind; one still served is simply loaded again (same fingerprint)
        self._client.expire(key, CALIBRATION_TTL_SECONDS)

    # Reads and admin.

    def reset(self, model: str | None = None, stream: str | None = None) -> int:
        """Restart the matching streams (their alarm totals are kept); raises redis.RedisError when the store is down."""
        count = 0
        for member in self._members():
            member_model, member_stream = member.split("\n", 1)
            if (model is None or member_model == model) and (stream is None or member_stream == stream):
                with self._lock:
                    self._admin_calls += 1
                    call_id = self._admin_calls
                keys = self._keys(member_model, member_stream, "none", caller="admin")
                status, _ = self._feed(keys=keys, args=self._arguments(call_id, "", "admin", member))
                count += status == "ok"
        return count

    def _members(self) -> list[str]:
        """Every stream's member (model \\n stream), least recently used first."""
        return [str(member) for member in cast(list[str], self._client.zrange(f"{self.options.prefix}:streams", 0, -1))]

    def store_status(self) -> dict[str, Any]:
        with self._lock:
            return {
                "kind": "redis",
                "status": "ok" if self.available else "unavailable",
                "error": self.last_error,
                "pending_inputs": self._pending_inputs + self._in_flight_inputs,
                "dropped_inputs": self.dropped_inputs,
                "errors": self.errors,
            }

    def snapshot(self, model: str | None = None) -> DriftSnapshot:
        """The shared streams as the store holds them now; status `unavailable` (and no streams) when it cannot answer
        within the timeout, or while this replica's updates are failing."""
        prefix = self.options.prefix
        try:
            members = [m for m in self._members() if model is None or m.split("\n", 1)[0] == model]
            pipeline = self._client.pipeline(transaction=False)
            for member in members:
                pipeline.hmget(f"{prefix}:state:{member}", REPORT_FIELDS)
            pipeline.hgetall(f"{prefix}:counters")
            *states, counters = pipeline.execute()
        except redis.RedisError as error:
            self._mark_unavailable(error)
            return DriftSnapshot([], {}, {}, self.store_status())
        with self._lock:  # the store answers; with nothing waiting to be sent this replica is in step with it
            if not self._pending and not self._in_flight and not self.available:
                self.available, self.last_error = True, None
        reports = [_report(member, dict(zip(REPORT_FIELDS, state, strict=True))) for member, state in zip(members, states, strict=True)
                   if state[0] is not None]
        evicted: dict[str, int] = {}
        restarts: dict[tuple[str, str], int] = {}
        for name, value in counters.items():
            parts = name.split("\n")
            if parts[0] == "evicted" and len(parts) == 2:
                evicted[parts[1]] = int(value)
            elif parts[0] == "restart" and len(parts) == 3:
                restarts[(parts[1], parts[2])] = int(value)
        return DriftSnapshot(reports, evicted, restarts, self.store_status())

    def reports(self, model: str | None = None) -> list[StreamReport]:
        return self.snapshot(model).reports

    def describe(self) -> dict[str, Any]:
        return self.settings.describe()

    def flush(self, timeout: float) -> bool:
        """Wait until every queued input has been applied (True) or `timeout` seconds pass (False)."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if not self._pending and not self._in_flight:
                    return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)

    def close(self) -> None:
        """Send what is queued (for up to CLOSE_FLUSH_SECONDS), stop the worker, close the connections."""
        self.flush(CLOSE_FLUSH_SECONDS)
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        self._worker.join(timeout=CLOSE_FLUSH_SECONDS)
        self._client.close()


REPORT_FIELDS = ("n", "since", "alarm", "change_alarm", "alarms_m", "alarms_c", "mmax", "logm", "logs")
"""The state fields a report reads (never `c`, whose packed doubles are not text)."""


def _report(member: str, state: dict[str, str]) -> StreamReport:
    model, stream = member.split("\n", 1)
    return StreamReport(
        model=model,
        stream=stream,
        inputs_since_reset=int(state["n"]),
        log10_martingale=float(state["logm"]) / LOG10,
        log10_martingale_max=float(state["mmax"]) / LOG10,
        log10_change_statistic=float(state["logs"]) / LOG10,
        alarm=state["alarm"] == "1",
        change_alarm=state["change_alarm"] == "1",
        alarms_total={"martingale": int(state["alarms_m"]), "change": int(state["alarms_c"])},
        since=float(state["since"]),
    )

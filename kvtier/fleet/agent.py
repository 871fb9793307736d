"""join_fleet: an instance (a CacheEngine, kvtier_server) joins a kvtier_controller's fleet.

    handle = join_fleet(config.controller, member)   # returns at once, controller up or not
    ...
    handle.stats()                                   # FleetStats: counters, the last error
    handle.close()                                   # stops the agent and the command server

It starts the command server (kvtier.fleet.command_server), makes an EventQueue (kvtier.fleet.events)
the member's key listener, and runs one daemon thread, the agent, that talks to the controller
through one JsonClient (kvtier.fleet.messages has every body):

    register        Registration (id, command URL and its token, namespace, chunk size, tiers, and
                    the P2P endpoint's URL when the member has one)
                    -> a session; then a full re-send:
    re-send         the queue cleared, then a `reset` event and `stored` events of the member's
                    key_snapshot(), in EventBatches of at most MAX_EVENT_KEYS keys; at most one
                    per `heartbeat_s`, but at once after a registration
    every tick      a Heartbeat every `heartbeat_s` (tier usage); queued events every
                    EVENT_INTERVAL_S, `seq` +1 per batch (0 is the first after a registration)

What the controller says steers it: `known=False` (or a 404: it restarted, lost its state, or marked
this instance down) -> register again (as a failure, backed off, when it came before any
acknowledgement since the registration); `resync=True` (it saw a gap in `seq`) -> a re-send, unless
the batch it answers began with a reset (which already was one); events dropped by the bounded
queue -> a re-send. Any failure (unreachable, a 5xx, a reply that is not the protocol) goes through
a FailureGuard (kvtier.tiers.backoff): one warning per outage, a back-off from 0.1 s up to
`heartbeat_s` between probes, then register and re-send (events may have been lost). A 4xx (a wrong
token) is a configuration problem: one error line, and a probe every `heartbeat_s`.

Where it runs: `join_fleet` and `close` on the owner's thread; `close` waits for the commands
running (at most COMMAND_DRAIN_S), then about `timeout_s` for the agent (a request in flight runs to
its deadline; the thread is a daemon), and does not deregister: the controller's heartbeat timeout
marks the instance down. `stats` from any thread. No torch here (kvtier_server joins with it).
"""

from __future__ import annotations

import logging
import threading
import time

from kvtier.config import FleetConfig
from kvtier.config_values import hide_url_secrets
from kvtier.errors import ConfigError, KvtierError
from kvtier.fleet.command_server import COMMAND_DRAIN_S, CommandServer
from kvtier.fleet.events import EventQueue, Run, batches
from kvtier.fleet.fleet_stats import FleetStats
from kvtier.fleet.http_client import HttpError, JsonClient, Unreachable
from kvtier.fleet.instance_ids import claim_instance_id, release_instance_id
from kvtier.fleet.instance_ids import resolve_instance_id as resolve_instance_id  # re-exported
from kvtier.fleet.member import FleetMember
from kvtier.fleet.messages import (
    EventBatch,
    EventsReply,
    Heartbeat,
    HeartbeatReply,
    KeyEvent,
    RegisterReply,
    Registration,
)
from kvtier.log_limit import LogLimiter
from kvtier.tiers.backoff import Backoff, Failure, FailureGuard

logger = logging.getLogger(__name__)
_log = LogLimiter(logger)

EVENT_INTERVAL_S = 0.1  # queued events wait at most about this long before they are sent
RETRY_INITIAL_S = 0.1  # the first back-off after a failure; it doubles up to heartbeat_s
MAX_LAYOUT_CHARS = 512  # Registration.layout's bound
# The controller's replies to the agent are a few hundred bytes; anything far larger is a broken
# controller, refused before it is read (not held in memory at every probe).
MAX_REPLY_BYTES = 1 << 20

class Forgotten(KvtierError):
    """The controller forgot this instance before acknowledging anything since registering it."""


def join_fleet(config: FleetConfig, member: FleetMember) -> FleetHandle:
    """Join the fleet of `config.url` with `member`; never waits for the controller. Raises
    ConfigError for an invalid `controller.instance_id` (or one this process uses already) or a
    command address it cannot listen on (kvtier.fleet.instance_ids has the default id)."""
    instance_id = claim_instance_id(config.instance_id)
    server, listening = None, False
    try:
        try:
            server = CommandServer(member, config.command_host, config.command_port, config.advertise_host)
        except OSError as exc:
            raise ConfigError(f"controller.command_host/command_port: cannot listen on "
                              f"{config.command_host}:{config.command_port}: {exc}") from exc
        queue = EventQueue(config.max_pending_events)
        agent = _Agent(config, member, instance_id, server, queue)
        server.start()
        member.set_key_listener(queue.append)
        listening = True
        return FleetHandle(agent, server, member)  # starts the agent's thread
    except BaseException:
        if listening:
            member.set_key_listener(None)
        if server is not None:
            server.stop()
        release_instance_id(instance_id)
        raise


class FleetHandle:
    def __init__(self, agent: _Agent, server: CommandServer, member: FleetMember):
        self._agent, self._server, self._member = agent, server, member
        self._thread = threading.Thread(target=agent.run, name="kvtier-fleet-agent", daemon=True)
        self._closed = False
        self._thread.start()

    @property
    def instance_id(self) -> str:
        return self._agent.instance_id

    @property
    def command_url(self) -> str:
        return self._server.url

    def stats(self) -> FleetStats:
        a = self._agent
        return FleetStats(a.instance_id, self._server.url, a.session is not None, a.registrations,
                          a.heartbeats, a.batches_sent, len(a.queue), a.queue.dropped, a.resyncs, a.errors,
                          self._server.stats.commands, a.last_error)

    def close(self) -> None:
        """Stop reporting keys, the agent and the command server. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._member.set_key_listener(None)
        except Exception:  # a member that cannot answer (a hung loop) must not keep the agent running
            logger.exception("fleet member did not drop its key listener; leaving the fleet anyway")
        self._agent.stop.set()
        self._agent.client.abort()  # a request waiting on a stalled controller fails now
        self._server.stop(timeout_s=COMMAND_DRAIN_S)
        self._thread.join(self._agent.config.timeout_s + 1.0)
        release_instance_id(self._agent.instance_id)
        if self._thread.is_alive():
            logger.warning("fleet agent still waiting on the controller; left to exit with the process")


class _Agent:
    """The agent thread's state and steps. Every field but `stop` is touched by that thread only."""

    def __init__(self, config: FleetConfig, member: FleetMember, instance_id: str, server: CommandServer,
                 queue: EventQueue):
        self.config, self.member, self.instance_id, self.queue = config, member, instance_id, queue
        self._server = server
        self.client = JsonClient(config.url, config.token, config.timeout_s, MAX_REPLY_BYTES)
        backoff = Backoff(min(RETRY_INITIAL_S, config.heartbeat_s), config.heartbeat_s)
        self._guard = FailureGuard(f"fleet controller {hide_url_secrets(config.url)}", backoff,
                                   self._count_errors, _log, _classify,
                                   meanwhile="key events queue up (a full re-send follows)")
        self._path = f"/v1/instances/{instance_id}"
        self.stop = threading.Event()
        self.session: str | None = None
        self._acknowledged = False  # the controller answered known=True since the registration
        self._seq = 0
        self._resync = True
        self._next_heartbeat = 0.0
        self._resend_after = 0.0  # no full re-send before (but at once after a registration)
        self.registrations = self.heartbeats = self.batches_sent = self.resyncs = self.errors = 0
        self.last_error: str | None = None

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                if self._guard.call(1, self._step) is None:  # failed, or backing off
                    self.session = None
                self.stop.wait(self._pause())
        finally:
            self.client.close()

    def _pause(self) -> float:
        if self.session is None:
            return EVENT_INTERVAL_S
        return min(EVENT_INTERVAL_S, max(0.0, self._next_heartbeat - time.monotonic()))

    def _count_errors(self, n: int) -> None:
        self.errors += n

    def _step(self) -> bool:
        try:
            if self.session is None:
                self._register()
            if (self.session is not None and (self._resync or self.queue.overflowed)
                    and time.monotonic() >= self._resend_after):
                self._resend()
            if self.session is not None and time.monotonic() >= self._next_heartbeat:
                self._heartbeat()
            if self.session is not None:
                self._send_all(self.queue.drain())
        except Exception as exc:
            self.last_error = f"{type(exc).__name__}: {exc}"
            raise
        return True

    def _register(self) -> None:
        d = self.member.describe()
        registration = Registration(
            instance_id=self.instance_id, kind=d.kind, command_url=self._server.url,
            command_token=self._server.token, model_id=d.model_id, namespace=d.namespace,
            chunk_size=d.chunk_size, save_partial_chunks=d.save_partial_chunks,
            layout=d.layout[:MAX_LAYOUT_CHARS], tiers=self.member.tier_usage(), p2p_url=d.p2p_url)
        reply = RegisterReply.model_validate(self.client.post("/v1/instances/register", registration))
        self.session, self._seq, self._resync, self._acknowledged = reply.session, 0, True, False
        self._resend_after = 0.0
        self._next_heartbeat = time.monotonic() + self.config.heartbeat_s
        self.registrations += 1
        if reply.heartbeat_timeout_s <= self.config.heartbeat_s:
            _log.warning("timeout", "the fleet controller marks an instance down after %g s without a "
                         "heartbeat, and controller.heartbeat_s is %g s: lower it",
                         reply.heartbeat_timeout_s, self.config.heartbeat_s)
        # Rate-limited: a controller that keeps forgetting this instance must not flood the log.
        what = "joined" if self.registrations == 1 else "registered again with"
        _log.log(logging.INFO, what, "%s the fleet at %s as %s (commands at %s)", what,
                 hide_url_secrets(self.config.url), self.instance_id, self._server.url)

    def _resend(self) -> None:
        # Cleared before the snapshot: what changes while it is taken arrives as events after it.
        # At most one a heartbeat: a controller asking at every batch (or a queue that overflows at
        # every tick) must not get a snapshot under the storage lock and every key 10 times a second.
        self._resync, self._resend_after = False, time.monotonic() + self.config.heartbeat_s
        self.queue.clear()
        snapshot = self.member.key_snapshot()
        self.resyncs += 1
        runs: list[Run] = [("reset", None, [])]
        runs += [("stored", tier, keys) for tier, keys in snapshot.items() if keys]
        self._send_all(runs)

    def _heartbeat(self) -> None:
        reply = self._post("/heartbeat", Heartbeat(session=self.session, tiers=self.member.tier_usage()),
                           HeartbeatReply)
        self._next_heartbeat = time.monotonic() + self.config.heartbeat_s
        if reply is None or not reply.known:
            self._forget()
        else:
            self.heartbeats += 1
            self._acknowledged = True

    def _send_all(self, runs: list[Run]) -> None:
        for events in batches(runs):
            if self.stop.is_set():
                return
            # Heartbeats go on between the batches of a long re-send (millions of keys), or the
            # controller would mark this instance down in the middle of it, and it would start over.
            if time.monotonic() >= self._next_heartbeat:
                self._heartbeat()
            if self.session is None or not self._send(events):
                return

    def _send(self, events: list[KeyEvent]) -> bool:
        """One batch; False when the controller no longer knows this instance."""
        batch = EventBatch(session=self.session, seq=self._seq, events=events)
        self._seq += 1
        reply = self._post("/events", batch, EventsReply)
        self.batches_sent += 1
        if reply is None or not reply.known:
            self._forget()
            return False
        self._acknowledged = True
        if reply.resync and events[0].op != "reset":
            self._resync = True
        return True

    def _post(self, path: str, body, reply_type):
        """The reply to one request to this instance's path; None when the controller answers 404."""
        try:
            return reply_type.model_validate(self.client.post(self._path + path, body))
        except HttpError as exc:
            if exc.status == 404:
                return None
            raise

    def _forget(self) -> None:
        self.session = None
        if not self._acknowledged:
            # Registered, then forgotten at the first answer: a controller that cannot keep this
            # instance (its state failing, its clock off) must not get a registration and a full key
            # snapshot 10 times a second: a failure, backed off like an outage.
            raise Forgotten("the controller forgot this instance right after registering it")
        _log.log(logging.INFO, "forgotten", "the fleet controller does not know %s (restarted, or marked "
                 "it down): registering again", self.instance_id)


def _classify(exc: Exception) -> Failure:
    if isinstance(exc, Unreachable | Forgotten):
        return Failure.OUTAGE
    if isinstance(exc, HttpError):
        if exc.status >= 500 or exc.status == 429:
            return Failure.OUTAGE
        return Failure.MISCONFIGURED  # 401 (a wrong token), 422 (a version it does not speak)
    return Failure.BUG  # a broken reply, a member that raised: a traceback, then as an outage

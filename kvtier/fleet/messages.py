"""The fleet's JSON messages: every body that crosses between kvtier_controller, its instances (a
CacheEngine or kvtier_server that joined through a `controller:` config section) and the `kvtier` CLI.

One model per body, validated on arrival with bounds (ids, key strings, list lengths), so a hostile
or broken peer gets a 422 naming the field, never an unbounded allocation. The controller's FastAPI
app publishes them in its OpenAPI document; the agent and the CLI build and parse the same models.

Chunk keys travel as 48 lower-case hex characters: the 8-byte namespace digest then the 16-byte
prefix-chained hash (`kvtier.keys.ChunkKey.hex()`), so a key is meaningful without its sender.

Flows (instance side in kvtier.fleet.agent, controller side in kvtier.controller):

    instance -> controller   POST /v1/instances/register   Registration   -> RegisterReply
                             POST /v1/instances/{id}/heartbeat  Heartbeat -> HeartbeatReply
                             POST /v1/instances/{id}/events     EventBatch -> EventsReply
    controller -> instance   POST {command_url}/v1/command      Command    -> CommandReply
                             (Authorization: Bearer <the instance's command_token>)
    clients -> controller    /v1/lookup, /v1/route, /v1/pin, /v1/unpin, /v1/move, /v1/compress,
                             /v1/decompress, /v1/clear, ...
"""

from __future__ import annotations

from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from kvtier.codecs.base import CODEC_NAMES

MAX_TOKENS = 1 << 20  # tokens in one lookup/route/pin/... request (a 1M-token prompt)
MAX_EVENT_KEYS = 65_536  # keys in one EventBatch, all events together
MAX_TIERS = 16

InstanceId = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
KeyHex = Annotated[str, Field(pattern=r"^[0-9a-f]{48}$")]
NamespaceHex = Annotated[str, Field(pattern=r"^[0-9a-f]{16}$")]
TierName = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,31}$")]
ModelId = Annotated[str, Field(min_length=1, max_length=512)]
CodecName = Literal[CODEC_NAMES]  # (kvtier.codecs.base: no torch, which neither server nor controller loads)
# Strict where clients and agents write them: JSON Schema's integer is neither `true`, `"1"` nor
# `2.0`, which pydantic's lax mode would take (`true` as token 1). Counts an instance reports stay lax.
Token = Annotated[int, Field(ge=0, lt=2**32, strict=True)]
Tokens = Annotated[list[Token], Field(max_length=MAX_TOKENS)]
Count = Annotated[int, Field(ge=0, lt=2**63)]
Seq = Annotated[int, Field(ge=0, lt=2**63, strict=True)]


def _parsable_url(url: str) -> str:
    # The pattern lets through a port that is no number or out of range, or a broken IPv6 host,
    # which only fail when the controller connects: refused here, at registration, instead.
    parts = urlsplit(url)
    if not parts.hostname:
        raise ValueError("the URL has no host")
    _ = parts.port  # ValueError for a port that is not a number in 0-65535
    return url


CommandUrl = Annotated[str, Field(pattern=r"^https?://[^\s/@?#]+$", max_length=300),
                       AfterValidator(_parsable_url)]
# An instance's P2P endpoint (kvtier.p2p.peer_server): the kvtier wire, as kvtier_server speaks it.
PeerUrl = Annotated[str, Field(pattern=r"^kvtier://[^\s/@?#]+$", max_length=300),
                    AfterValidator(_parsable_url)]
MAX_PEER_KEYS = 4096  # keys in one /v1/peers question: a 1M-token prompt in 256-token chunks


class Message(BaseModel):
    # Unknown fields are an error: a typo in a script is reported, not ignored.
    model_config = ConfigDict(extra="forbid", frozen=True)


# -- instance -> controller ----------------------------------------------------------------------

class TierUsage(Message):
    name: TierName
    chunks: Count
    bytes_used: Count
    capacity_bytes: Count


class Registration(Message):
    instance_id: InstanceId
    kind: Literal["engine", "server"]
    command_url: CommandUrl
    command_token: Annotated[str, Field(min_length=16, max_length=256)]  # never shown by the controller
    # An engine's namespace; a kvtier_server holds many and sends None (its keys carry their own).
    model_id: ModelId | None
    namespace: NamespaceHex | None
    chunk_size: Annotated[int, Field(ge=1, le=1 << 20, strict=True)]
    save_partial_chunks: bool = False
    layout: Annotated[str, Field(max_length=512)] = ""  # KVLayout.describe(), for people
    tiers: Annotated[list[TierUsage], Field(max_length=MAX_TIERS)]
    p2p_url: PeerUrl | None = None  # where peers read this engine's chunks (None: no P2P endpoint)


class RegisterReply(Message):
    heartbeat_timeout_s: float  # miss heartbeats this long and the instance is down
    session: str  # changes when the controller loses its state: the instance re-registers


class Heartbeat(Message):
    session: Annotated[str, Field(max_length=128)]  # from RegisterReply
    tiers: Annotated[list[TierUsage], Field(max_length=MAX_TIERS)]


class HeartbeatReply(Message):
    # False: the controller does not know this instance (restarted, or marked it down): register
    # again and send the full key set.
    known: bool


class KeyEvent(Message):
    # stored: the keys are now in `tier`; evicted: they left `tier` (evicted, moved away, deleted);
    # cleared: every key of this instance left `tier` (keys empty); reset: every key of this
    # instance left every tier (tier and keys empty): the first event of a full re-send.
    op: Literal["stored", "evicted", "cleared", "reset"]
    tier: TierName | None = None
    keys: Annotated[list[KeyHex], Field(max_length=MAX_EVENT_KEYS)] = []


class EventBatch(Message):
    session: Annotated[str, Field(max_length=128)]
    seq: Seq  # per instance, +1 per batch: a gap means lost events and the controller says resync
    events: Annotated[list[KeyEvent], Field(max_length=MAX_EVENT_KEYS)]

    @model_validator(mode="after")
    def _bounded(self) -> EventBatch:
        # Each event's list is bounded alone; without this, 64K events of 64K keys would pass.
        total = sum(len(event.keys) for event in self.events)
        if total > MAX_EVENT_KEYS:
            raise ValueError(f"events: at most {MAX_EVENT_KEYS} keys in one batch, got {total}")
        # A `cleared` walks every key the instance has in the index: one per tier is all a batch
        # needs, and 64K of them over 1M keys would hold the index for hours.
        clears = sum(event.op == "cleared" for event in self.events)
        if clears > MAX_TIERS:
            raise ValueError(f"events: at most {MAX_TIERS} cleared events in one batch, got {clears}")
        return self


class EventsReply(Message):
    known: bool  # as in HeartbeatReply
    resync: bool = False  # a batch was lost (seq gap): send a reset and the full key set


# -- controller -> instance ----------------------------------------------------------------------

class Command(Message):
    # pin/unpin/move/compress/decompress act on the leading `keys` this instance holds (a prompt's
    # prefix); clear on a tier or on everything (tier None); stats returns the tiers' usage.
    op: Literal["pin", "unpin", "move", "compress", "decompress", "clear", "stats"]
    keys: Annotated[list[KeyHex], Field(max_length=MAX_TOKENS)] = []
    # move: the destination; compress: the tier whose records to recode; decompress and clear: the
    # tier (None: all)
    tier: TierName | None = None
    copy_: bool = Field(False, alias="copy")  # move: keep the source copy too
    codec: CodecName | None = None  # compress: the codec to recode with
    # The prompt's length: where its last chunk ends, when it is a partial one (save_partial_chunks).
    num_tokens: Annotated[int, Field(ge=0, le=MAX_TOKENS, strict=True)] | None = None

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class CommandReply(Message):
    chunks: Count  # chunks pinned / unpinned / moved / removed
    tiers: Annotated[list[TierUsage], Field(max_length=MAX_TIERS)] = []


# -- clients -> controller -----------------------------------------------------------------------

class PromptRequest(Message):
    model_id: ModelId
    tokens: Tokens


class AdminRequest(PromptRequest):
    instance_id: InstanceId | None = None  # None: every instance of the model that is up


class MoveRequest(PromptRequest):
    instance_id: InstanceId
    to: TierName
    copy_: bool = Field(False, alias="copy")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class CompressRequest(PromptRequest):
    """Recode the prompt's cached chunks in one tier below host memory of one instance."""

    instance_id: InstanceId
    codec: CodecName
    tier: TierName


class DecompressRequest(PromptRequest):
    """Recode them raw: in one tier, or in every writable tier below host memory (tier None)."""

    instance_id: InstanceId
    tier: TierName | None = None


class ClearRequest(Message):
    instance_id: InstanceId | None = None
    tier: TierName | None = None


class InstanceHit(Message):
    instance_id: str
    hit_tokens: int  # leading tokens of the prompt this instance holds (a chunk boundary)
    chunk_size: int
    tiers: list[str]  # per hit chunk, the fastest tier holding it


class LookupReply(Message):
    model_id: str
    num_tokens: int
    hit_tokens: int  # the longest prefix any instance holds
    instances: list[InstanceHit]  # every instance of the model that is up, longest hit first


class RouteEntry(Message):
    instance_id: str
    hit_tokens: int
    free_bytes: int  # capacity left in its fastest tier


class RouteReply(Message):
    instances: list[RouteEntry]  # engines of the model that are up: longest hit, then most free


class PeersRequest(Message):
    """An instance with P2P asks who else holds chunks it misses (POST /v1/peers, agent token)."""

    keys: Annotated[list[KeyHex], Field(min_length=1, max_length=MAX_PEER_KEYS)]
    exclude: InstanceId | None = None  # the asking instance itself


class PeerHolding(Message):
    instance_id: str
    p2p_url: str  # a PeerUrl; the reader checks each (kvtier.p2p.directory) and skips a bad one alone
    held: list[bool]  # per requested key: this peer holds it (in some tier)
    in_memory: list[bool]  # per requested key: in its fastest tier (a READ without a disk read)


class PeersReply(Message):
    # Up engines with a P2P endpoint that hold at least one of the keys, most leading keys first:
    # the best MAX_PEERS of them (kvtier.controller.fleet_lookup).
    peers: list[PeerHolding]


class InstanceResult(Message):
    instance_id: str
    chunks: int


class AdminReply(Message):
    results: list[InstanceResult]


class InstanceView(Message):
    instance_id: str
    kind: str
    address: str  # its command URL
    p2p_url: str | None = None  # its P2P endpoint, when it has one
    model_id: str | None
    namespace: str | None
    chunk_size: int
    layout: str
    tiers: list[TierUsage]
    last_heartbeat_s: float  # seconds since its last heartbeat
    up: bool
    chunks_indexed: int


class InstancesReply(Message):
    instances: list[InstanceView]


class StatsReply(Message):
    instances_up: int
    instances_down: int
    index_chunks: int  # (key, instance) entries in the index
    index_bytes: int  # estimated memory of the index (0 when it lives in Redis)
    requests: dict[str, int]  # per endpoint


class ErrorReply(Message):
    detail: str

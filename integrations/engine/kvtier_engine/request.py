"""A request's life in the engine: its tokens, how far its KV is computed, and what it cost.

    WAITING --admitted--> RUNNING --stop/length/abort/error--> FINISHED_*
       ^  |                  |
       |  +--asynchronous kvtier load--> WAITING_FOR_KV --load landed--> WAITING (ready: blocks held)
       +----preempted--------+      (blocks freed; everything after the cached prefix recomputed)

WAITING_FOR_KV: admitted with its blocks, its kvtier load running in the background; in no step and
no batch slot until the load lands (an abort meanwhile takes effect then: its blocks are in use).

FINISHED_ERROR: the engine could not go on with the request (its step's forward failed, its logits
were not finite, its token could not be decoded); its last step's KV is not trusted and not saved.

`token_ids` is the prompt followed by the generated tokens. `num_computed_tokens` counts the leading
tokens whose KV is in the paged cache, whether computed here, found in the device prefix cache or
loaded from kvtier. Only the scheduler changes it.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from kvtier_engine.sampling import SamplingParams, TokenLogprobs


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    WAITING_FOR_KV = "waiting_for_kv"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"  # EOS or a stop string
    FINISHED_LENGTH = "length"  # max_tokens or the model's context
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"

    @property
    def finished(self) -> bool:
        return self not in (RequestStatus.WAITING, RequestStatus.WAITING_FOR_KV, RequestStatus.RUNNING)


@dataclass(slots=True)
class RequestMetrics:
    """What one request cost; returned with its output."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    # Prompt tokens this engine ran through every layer of the model. A blended request's reused rows
    # (`blend_tokens_reused`) still ran through layers 0..check_layer-1 but are not counted here, so
    # computed + reused + loaded + cached on device = the prompt (one admission, no preemption).
    prefill_tokens_computed: int = 0
    tokens_cached_on_device: int = 0  # prompt tokens found in the device prefix cache
    tokens_loaded: int = 0  # prompt tokens whose KV came from kvtier
    num_preemptions: int = 0
    # CacheBlend (`blend:`): passages whose cached KV was loaded, prompt tokens after the head that
    # kept it, and those computed through every layer (all zero for a request that was not blended).
    blend_segments_hit: int = 0
    blend_tokens_reused: int = 0
    blend_tokens_recomputed: int = 0

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def e2e_s(self) -> float | None:
        return None if self.finished_time is None else self.finished_time - self.arrival_time


@dataclass(slots=True, eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    generator: torch.Generator | None = None
    prompt: str | None = None
    token_ids: list[int] = field(init=False)
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    metrics: RequestMetrics = field(default_factory=lambda: RequestMetrics(time.perf_counter()))
    output_text: str = ""
    num_text_sent: int = 0  # characters of output_text already streamed
    output_logprobs: list[TokenLogprobs] = field(default_factory=list)  # when params.logprobs is set
    wants_seat_to_park: bool = False  # its last lookup found an asynchronous load and no seat to park in
    # Disaggregated prefill (kvtier_engine.disagg): what the client's request asked (vLLM's name, read
    # by kvtier's connector), and what this instance answers once it finished (a prefill's reply).
    kv_transfer_params: dict | None = None
    transfer_reply: dict | None = None

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError(f"request {self.request_id}: empty prompt")
        self.token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def all_token_ids(self) -> list[int]:
        """The name kvtier's connector reads (vLLM's): every token so far."""
        return self.token_ids

"""What a fleet member says about itself at registration (`kvtier.fleet.member.Description`), as a
value: built by `EngineMember.describe` and `ServerMember.describe`, read by the fleet agent.

No torch here: kvtier_server builds one too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True, slots=True)
class MemberDescription:
    kind: Literal["engine", "server"]
    model_id: str | None
    namespace: str | None  # 16 hex characters, or None for a server (many namespaces)
    chunk_size: int
    save_partial_chunks: bool = False
    layout: str = ""  # KVLayout.describe(), for people
    p2p_url: str | None = None  # kvtier://host:port of its P2P endpoint (kvtier.p2p.peer_server), if any

"""kvtier's KV connector: the hooks an engine calls to load cached KV and save computed KV.

Scheduler side (`KvtierSchedulerConnector`) and worker side (`KvtierWorkerConnector`) are separate
classes with vLLM's method names; `ConnectorMetadata` is all that passes between them, once per step.
"""

from kvtier.connector.metadata import ConnectorMetadata, KVEvent, LoadSpec, SaveSpec
from kvtier.connector.scheduler import KvtierSchedulerConnector
from kvtier.connector.worker import KvtierWorkerConnector, PagedKV

__all__ = ["ConnectorMetadata", "KVEvent", "KvtierSchedulerConnector", "KvtierWorkerConnector", "LoadSpec",
           "PagedKV", "SaveSpec"]

"""kvtier's KV connector for vLLM: `KvtierConnector` (kvtier_vllm.connector), loaded by vLLM from
`kv_connector="KvtierConnector", kv_connector_module_path="kvtier_vllm"`.

vLLM is imported only when the connector is asked for: the layout code (kvtier_vllm.paged_kv) and
the config code (kvtier_vllm.setup_engine) load without it.
"""


def __getattr__(name: str):
    if name == "KvtierConnector":
        from kvtier_vllm.connector import KvtierConnector

        return KvtierConnector
    raise AttributeError(f"module 'kvtier_vllm' has no attribute {name!r}")

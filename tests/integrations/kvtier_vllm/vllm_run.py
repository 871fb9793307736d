"""One vLLM process for the end-to-end tests: `python vllm_run.py MODEL_DIR PROMPTS_JSON [KVTIER_YAML]`
runs `vllm.LLM` on the prompts (lists of token ids; greedy, 12 tokens each), with kvtier's connector
when a kvtier config is given, and prints one JSON line: each prompt's generated token ids and the
prompt tokens vLLM did not compute (`num_cached_tokens`: kvtier's loads; vLLM's own prefix cache is
off). Run as a script, in the venv that has vLLM (`make vllm-venv`).

`$RUN_TENSOR_PARALLEL` sets vLLM's tensor-parallel size (default 1). With one rank, vLLM's engine core
runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`): one start-up of vLLM less per run, the
same connector calls (the scheduler side and the worker side are still separate objects).

With `$RUN_EVENTS_WANT` (a number of chunks), vLLM's KV cache events are on, published over ZMQ to
a SUB socket this process binds first (vLLM's PUB connects to it) and kept for replay on a free
loopback port. After generating, this process asks the replay for every batch from the first on, and
again whenever a new batch reaches the SUB socket, until that many distinct chunks were stored in host
memory or a 30 s deadline passed; the JSON also holds those `BlockStored` events (digest, parent,
tokens; hex). (The SUB socket alone can miss the first batches: the publisher drops what it sends
before the subscription reached it; it only says when to ask the replay again.)"""

import json
import os
import socket
import sys
import time

EVENTS_DEADLINE_S = 30.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def subscribe():
    """(a SUB socket bound to a free loopback port, the port)."""
    import zmq

    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    return sub, sub.bind_to_random_port("tcp://127.0.0.1")


def stored_in_memory(sub, replay_port: int, want: int) -> list[dict]:
    """The CPU `BlockStored` events vLLM published, read through its replay endpoint until `want`
    distinct chunks were seen (or the deadline); a batch arriving at `sub` starts the next read."""
    import msgspec
    import zmq
    from vllm.distributed.kv_events import MEDIUM_CPU, BlockStored, KVEventBatch, ZmqEventPublisher

    decoder, seen, next_seq = msgspec.msgpack.Decoder(type=KVEventBatch), {}, 0
    replay = zmq.Context.instance().socket(zmq.DEALER)  # one request, many replies
    replay.connect(f"tcp://127.0.0.1:{replay_port}")
    deadline = time.monotonic() + EVENTS_DEADLINE_S

    def left_ms() -> int:
        return int(max(deadline - time.monotonic(), 0) * 1000)

    while len(seen) < want:
        replay.send_multipart((b"", next_seq.to_bytes(8, "big")))
        while replay.poll(left_ms()):
            _empty, _topic, seq, payload = replay.recv_multipart()
            if seq == ZmqEventPublisher.END_SEQ:
                break
            next_seq = int.from_bytes(seq, "big") + 1
            for event in decoder.decode(payload).events:
                if isinstance(event, BlockStored) and event.medium == MEDIUM_CPU:
                    parent = event.parent_block_hash and event.parent_block_hash.hex()
                    for digest in event.block_hashes:
                        seen[digest.hex()] = {"tokens": event.token_ids, "block_size": event.block_size,
                                              "parent": parent}
        else:
            break  # no answer before the deadline
        if len(seen) < want:  # all replayed: wait for the publisher's next batch
            if not sub.poll(left_ms()):
                break
            while sub.poll(0):
                sub.recv_multipart()
    return [{"digest": digest, **info} for digest, info in seen.items()]


def main() -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache: the machine has 24
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    os.environ["HF_HUB_OFFLINE"] = "1"
    from vllm import LLM, SamplingParams
    from vllm.config import KVEventsConfig, KVTransferConfig

    model, prompts = sys.argv[1], json.loads(open(sys.argv[2]).read())
    kwargs = {}
    if len(sys.argv) > 3:
        kwargs["kv_transfer_config"] = KVTransferConfig(
            kv_connector="KvtierConnector", kv_connector_module_path="kvtier_vllm", kv_role="kv_both",
            kv_connector_extra_config={"kvtier_config": sys.argv[3]})
    want, replay_port, sub = int(os.environ.get("RUN_EVENTS_WANT", "0")), free_port(), None
    if want:  # (a host endpoint, so the publisher connects to `sub`; the replay endpoint it binds)
        sub, sub_port = subscribe()
        kwargs["kv_events_config"] = KVEventsConfig(
            enable_kv_cache_events=True, publisher="zmq", endpoint=f"tcp://127.0.0.1:{sub_port}",
            replay_endpoint=f"tcp://127.0.0.1:{replay_port}")
    tensor_parallel = int(os.environ.get("RUN_TENSOR_PARALLEL", "1"))
    if tensor_parallel == 1:  # the engine core in this process: one vLLM start-up (~10 s) less per run
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    llm = LLM(model=model, tensor_parallel_size=tensor_parallel, dtype="float32", skip_tokenizer_init=True,
              max_model_len=2048, enable_prefix_caching=False, enforce_eager=True, **kwargs)
    params = SamplingParams(max_tokens=12, temperature=0, detokenize=False)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    result = {"tokens": [list(o.outputs[0].token_ids) for o in outs],
              "cached": [o.num_cached_tokens for o in outs]}
    if want:
        result["stored"] = stored_in_memory(sub, replay_port, want)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()

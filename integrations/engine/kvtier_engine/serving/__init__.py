"""`kvtier_engine serve`: an OpenAI-compatible HTTP server over one LLMEngine; `kvtier_engine proxy`:
the disaggregated-prefill router in front of several.

    cli              the command line; process-wide setup (logging, signals) happens here only
    server           the FastAPI app (routes, error handlers, streaming) and uvicorn's lifecycle
    engine_loop      the engine stepping on its own thread; requests in, outputs out to asyncio
    openai_protocol  pure functions: completions request parsing and validation, response and chunk
                     bodies, and the field checks and sampling parameters every endpoint shares
    openai_chat      the same for chat completions (messages rendered by ../chat_template.py)
    choices          one call, several engine requests: a batch of prompts, `n` choices each
    http_protocol    uvicorn's HTTP/1.1 protocol with a deadline on the request head
    disconnect       work for a request that stops when its client leaves (server and proxy)
    disagg_routes    POST /v1/kv/release: a prefill's KV held for a decode instance let go
    proxy            `kvtier_engine proxy`: prefill on one instance, decode on another (+ proxy_flow,
                     proxy_relay, proxy_upstream, proxy_backends, proxy_bodies)

The only part of the package that imports FastAPI, starlette and uvicorn.
"""

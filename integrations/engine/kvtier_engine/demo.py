"""`make demo`: the engine on a real model (SmolLM2-135M-Instruct) without and with kvtier, through a
multi-round chat and a question-answer session over a long document; per round, the time to first
token of each, what kvtier served, and the answer, which must be the same with and without kvtier.

    python -m kvtier_engine.demo --config configs/cpu_disk.yaml

Two engines with the same weights, one without kvtier and one with the given config, run every prompt
in turn, greedily. Both have the device prefix cache off, so the engine without kvtier recomputes
every prompt, as on a GPU whose paged cache other users' requests have filled (benchmarks/ measures
the prefix cache on and a small paged cache). The chat's round k holds the model's own earlier answers;
the document is the `json` package's documentation, read from this Python with pydoc. Greedy decoding
makes every run see the same tokens: run it twice and the second process loads round 1 from the disk
tier the first one filled. With `--model random:...` (seeded weights) the prompts are seeded token ids
and the assistant turns scripted, as the tests and large-geometry benchmarks use.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import io
import json
import logging
import pydoc
import re
import sys
import time
from collections.abc import Callable, Iterator

import numpy as np
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from kvtier import load_config
from kvtier_engine.chat_template import check_messages, render_chat, without_double_bos
from kvtier_engine.llm import LLM
from kvtier_engine.sampling import SamplingParams

MODEL = "smollm2-135m-instruct"
VOCAB = 32_000  # seeded ids stay below it: valid for every preset and for SmolLM2's 49,152
RANDOM_PARAMS = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
# A session: given the answers so far (appended by the runner), it yields each round's prompt ids.
Session = Callable[[list[str]], Iterator[list[int]]]

CHAT_SYSTEM = ("You are a concise assistant who knows Python well. Answer in one or two sentences. "
               "Here is the Zen of Python, which the user will ask about:\n\n")
CHAT_QUESTIONS = ("What does the Zen of Python say about explicit and implicit code?",
                  "And what does it say about errors?",
                  "Summarize your two previous answers in one sentence.")
DOC_SYSTEM = "You answer questions about the documentation below in one short sentence.\n\n"
DOC_QUESTIONS = ("Which function serializes a Python object to a JSON formatted str?",
                 "Which externally maintained library is the json module derived from?",
                 "Which function deserializes a JSON document from a file-like object?")


def sessions(seed: int, doc_tokens: int, rounds: int, vocab: int = VOCAB) -> dict[str, list[list[int]]]:
    """Random presets' prompts, round by round: a chat (system prompt, then question / scripted answer
    turns; a round's prompt is the whole conversation) and questions about one long document."""
    rng = np.random.default_rng(seed)

    def ids(n: int) -> list[int]:
        return rng.integers(0, vocab, n).tolist()

    chat, conversation = [], ids(1024)
    for _ in range(rounds):
        conversation += ids(64)  # the user's question
        chat.append(list(conversation))
        conversation += ids(192)  # the assistant's answer (scripted: the same in every run)
    document = ids(doc_tokens)
    return {"multi-round chat": chat, "long-document Q&A": [document + ids(48) for _ in range(rounds)]}


def chat_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """The prompt ids of `messages` through the model's chat template, ready for the assistant."""
    text = render_chat(check_messages(messages), tokenizer.chat_template, tokenizer.bos_token,
                       tokenizer.eos_token)
    return without_double_bos(tokenizer.encode(text), tokenizer.bos_token_id)


def document_text() -> str:
    """The `json` package's documentation as `help(json)` prints it, less the memory addresses in
    default values' reprs ("<... object at 0x7f...>"): they change with every process, and a
    document that changes is not the same document (its KV is not on disk for the next run)."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", pydoc.render_doc(json, renderer=pydoc.plaintext))


def document(tokenizer, max_tokens: int) -> str:
    """`document_text()` cut to `max_tokens` tokens."""
    return tokenizer.decode(tokenizer.encode(document_text())[:max_tokens])


def zen_of_python() -> str:
    """PEP 20's text, from the `this` module, which prints it on import and keeps it rot13-encoded."""
    with contextlib.redirect_stdout(io.StringIO()):
        import this
    return codecs.decode(this.s, "rot13")


def text_sessions(tokenizer, doc_tokens: int, rounds: int) -> dict[str, Session]:
    """A chat whose round k holds the model's k-1 earlier answers, and questions about one document."""
    zen = zen_of_python()

    def chat(answers: list[str]) -> Iterator[list[int]]:
        messages = [{"role": "system", "content": CHAT_SYSTEM + zen}]
        for question in CHAT_QUESTIONS[:rounds]:
            if len(messages) > 1:
                messages.append({"role": "assistant", "content": answers[-1]})
            messages.append({"role": "user", "content": question})
            yield chat_ids(tokenizer, messages)

    doc = DOC_SYSTEM + document(tokenizer, doc_tokens)

    def qa(answers: list[str]) -> Iterator[list[int]]:
        for question in DOC_QUESTIONS[:rounds]:
            messages = [{"role": "system", "content": doc}, {"role": "user", "content": question}]
            yield chat_ids(tokenizer, messages)

    return {"multi-round chat": chat, "long-document Q&A": qa}


def served_by(before: dict, after: dict) -> tuple[str, int]:
    """Tiers that served hits between two `stats()`, and the disk tier's chunk hits."""
    tiers = [t for t in after["tiers"] if after["tiers"][t]["hits"] > before["tiers"][t]["hits"]]
    disk = after["tiers"].get("disk", {}).get("hits", 0) - before["tiers"].get("disk", {}).get("hits", 0)
    return "+".join(tiers) or "-", disk


def run_round(prompt: list[int], params: SamplingParams, without: LLM, with_kv: LLM, progress, task):
    """One prompt on both engines: (without's output, with's output, tiers that served, disk hits)."""
    kv = with_kv.engine.kvtier
    progress.refresh()
    base = without.generate(prompt, params)[0]
    progress.update(task, advance=1, refresh=True)
    before = kv.stats()
    got = with_kv.generate(prompt, params)[0]
    progress.update(task, advance=1, refresh=True)
    kv.flush()  # the write-through to disk lands now: a later process finds it
    tiers, disk = served_by(before, kv.stats())
    return base, got, tiers, disk


def run_session(console: Console, name: str, session: Session, rounds: int, params: SamplingParams,
                engines: tuple[LLM, LLM], show_answers: bool) -> tuple[int, int]:
    """Prints the session's table and answers; returns the disk-tier chunk hits of its first round and
    the number of rounds whose answers differ between the engines."""
    table = Table(title=f"{name}: time to first token without / with kvtier")
    for col in ("round", "prompt tokens", "TTFT without", "TTFT with", "speedup", "tokens loaded",
                "hit rate"):
        table.add_column(col, justify="left" if col == "round" else "right")
    table.add_column("served by", min_width=8)  # "cpu+disk" whole
    table.add_column("same answer")
    first_disk, differ, answers = 0, 0, []
    # Redrawn between requests only: an auto-refresh thread would take the GIL inside timed requests.
    with Progress(console=console, transient=True, auto_refresh=False) as progress:
        task = progress.add_task(name, total=2 * rounds)
        for i, prompt in enumerate(session(answers)):
            base, got, tiers, disk = run_round(prompt, params, *engines, progress, task)
            first_disk = disk if i == 0 else first_disk
            same = base.token_ids == got.token_ids
            differ += not same
            answers.append(base.text.strip())  # the chat's next round holds it
            b, g = base.metrics, got.metrics
            table.add_row(str(i + 1), f"{len(prompt):,}", f"{b.ttft_s:.2f} s", f"{g.ttft_s:.2f} s",
                          f"{b.ttft_s / g.ttft_s:.1f}x", f"{g.tokens_loaded:,}",
                          f"{g.tokens_loaded / len(prompt):.0%}", tiers, "yes" if same else "[red]NO[/]")
    console.print(table)
    if show_answers:
        for i, answer in enumerate(answers):
            console.print(f"  answer {i + 1}: {answer!r}", soft_wrap=True)
    return first_disk, differ


def report(console: Console, first_disk: dict[str, int], differ: int, rounds: int, config, stats) -> None:
    """Where round 1 came from, whether the answers matched, and each tier's totals."""
    for name, chunks in first_disk.items():
        if chunks:
            console.print(f"{name}, round 1: served from the disk tier ({chunks} chunks read from disk): "
                          "a previous run stored them there.")
    if not any(first_disk.values()) and config.disk is not None:
        console.print("Round 1 of each session was computed: nothing of it was on disk yet. Run "
                      "`make demo` again: the second process loads it from the disk tier this run filled.")
    if differ:
        console.print(f"[bold red]answers DIFFER with and without kvtier in {differ} of {rounds} rounds[/]")
    else:
        console.print(f"[bold green]answers identical with and without kvtier in all {rounds} rounds[/] "
                      "(greedy: the same tokens)")
    for name, tier in stats["tiers"].items():
        console.print(f"  {name} tier: {tier['chunks']} chunks, {tier['bytes'] / 2**20:,.0f} MiB, "
                      f"hits {tier['hits']}, misses {tier['misses']}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None,
                        help="kvtier YAML config (default: KVTIER_CONFIG or built-in)")
    parser.add_argument("--model", default=MODEL, help="a named model, a .gguf path or a random:* preset")
    parser.add_argument("--seed", type=int, default=0, help="random presets' weights and token ids")
    parser.add_argument("--doc-tokens", type=int, default=None,
                        help="the document's tokens (default: 4096 real text, 2048 random)")
    parser.add_argument("--max-tokens", type=int, default=24, help="tokens per answer (real model)")
    parser.add_argument("--rounds", type=int, default=3)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    console = Console() if sys.stdout.isatty() else Console(width=110)  # wide enough for a table
    config, text = load_config(args.config), not args.model.startswith("random:")
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0) if text else RANDOM_PARAMS
    options = {"seed": args.seed, "enable_prefix_caching": False, "kv_cache_bytes": 256 << 20}
    started = time.perf_counter()
    with LLM(args.model, **options) as without, LLM(args.model, kvtier_config=config, **options) as with_kv:
        disk = f", disk tier at {config.disk.path}" if config.disk is not None else ""
        console.print(f"[bold]kvtier engine demo[/]: {args.model} on {with_kv.engine.cache.kv.device}, "
                      f"kvtier config {config.source}{disk}; models loaded in "
                      f"{time.perf_counter() - started:.0f} s")
        console.print("Each prompt runs on two engines with the same weights, without and with kvtier, "
                      "greedily. Both have the device prefix cache off, as when other users' requests "
                      "have filled the GPU's KV cache: without kvtier every prompt is computed again.")
        # An engine's first forward passes pay one-off costs; over 512 tokens, attention's long-query path
        # is warm too. The engine with kvtier stores its two whole chunks (and finds them on a rerun).
        vocab = min(VOCAB, with_kv.engine.model.config.vocab_size)
        warm_up = np.random.default_rng(args.seed + 1).integers(0, vocab, 600).tolist()
        for llm in (without, with_kv):
            llm.generate(warm_up, RANDOM_PARAMS)
        if text:
            named = text_sessions(without.tokenizer, args.doc_tokens or 4096, args.rounds)
        else:
            seeded = sessions(args.seed, args.doc_tokens or 2048, args.rounds, vocab)
            named = {name: (lambda _, p=prompts: iter(p)) for name, prompts in seeded.items()}
        results = {name: run_session(console, name, session, args.rounds, params, (without, with_kv), text)
                   for name, session in named.items()}
        stats = with_kv.engine.kvtier.stats()
    differ = sum(d for _, d in results.values())
    report(console, {n: r[0] for n, r in results.items()}, differ, len(results) * args.rounds, config, stats)
    console.print(f"{time.perf_counter() - started:.0f} s")
    return 1 if differ else 0


if __name__ == "__main__":
    raise SystemExit(main())

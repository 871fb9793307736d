"""`make demo` (kvtier_engine.demo) on the tiny random preset: both engines give the same tokens,
and a second process finds round 1 in the disk tier the first one filled. The real-model run
(smollm2-135m-instruct) takes minutes on CPU: the closing note records it."""

from __future__ import annotations

import subprocess
import sys

from kvtier_engine import demo

CONFIG = "chunk_size: 64\ncpu:\n  capacity: 64MiB\ndisk:\n  path: {path}\n  capacity: 256MiB\n"


def test_the_demo_matches_answers_and_a_second_run_loads_round_one_from_disk(tmp_path, capsys):
    config = tmp_path / "kvtier.yaml"
    config.write_text(CONFIG.format(path=tmp_path / "disk"))
    argv = ["--config", str(config), "--model", "random:llama-tiny", "--doc-tokens", "256", "--rounds", "2"]

    assert demo.main(argv) == 0
    first = capsys.readouterr().out
    assert "answers identical with and without kvtier in all 4 rounds" in first
    assert "Round 1 of each session was computed" in first

    assert demo.main(argv) == 0
    second = capsys.readouterr().out
    assert "multi-round chat, round 1: served from the disk tier" in second
    assert "long-document Q&A, round 1: served from the disk tier" in second


def test_the_chat_s_later_rounds_hold_the_model_s_earlier_answers():
    chat = demo.text_sessions(_ChatTokenizer(), 64, 3)["multi-round chat"]
    answers: list[str] = []
    prompts = []
    for i, ids in enumerate(chat(answers)):
        prompts.append(bytes(ids).decode())
        answers.append(f"ANSWER-{i}")
    assert len(prompts) == 3
    assert "ANSWER-0" not in prompts[0] and "ANSWER-0" in prompts[1]
    assert "ANSWER-0" in prompts[2] and "ANSWER-1" in prompts[2]
    assert prompts[2].startswith(prompts[1].rsplit("<|im_start|>assistant", 1)[0])


class _ChatTokenizer:
    """Bytes as ids, with a ChatML template like SmolLM2's."""

    chat_template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
                     "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    bos_token = eos_token = None
    bos_token_id = eos_token_id = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode(errors="replace")


def test_the_document_is_the_same_text_in_every_process():
    # pydoc prints default values' reprs, some with memory addresses: before they were cut, the
    # document changed after ~2.5K tokens in every process and a second run missed the disk there.
    code = "from kvtier_engine import demo; import sys; sys.stdout.write(demo.document_text())"
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           timeout=60).stdout for _ in range(2)]
    assert runs[0] == runs[1]
    assert len(runs[0]) > 20_000 and "0x" not in runs[0]

"""Users taking turns, as ``q8chat bench --concurrency`` measures them: each resends its whole history, and
the server should find all of it but the new question in its caches (a slot of its own, or the kept
conversations)."""

from __future__ import annotations

from pathlib import Path

import aiohttp

from bench.served import SERVED_NAME, ServerProcess, stream_chat, with_session
from prompts import heldout_text


def alternating_chats(
    base_url: str, model: str, system: str, questions: list[str], turns: int, max_tokens: int, users: int = 2
) -> list[list[dict]]:
    """``users`` conversations of ``turns`` turns each, taken in turn (user 0's first turn, user 1's first
    turn, ..., user 0's second turn, ...), each resending its whole history, answers as the model ended
    them, as a chat client does. For each user, each turn's prompt tokens, how many of them the server had
    cached, and the answer's tokens. Each conversation's system message is ``system`` after the user's
    number."""
    histories = [[{"role": "system", "content": f"User {user}. {system}"}] for user in range(users)]
    asked = iter(questions)
    usage: list[list[dict]] = [[] for _ in range(users)]

    async def chat(session: aiohttp.ClientSession) -> None:
        for _ in range(turns):
            for user, history in enumerate(histories):
                history.append({"role": "user", "content": next(asked)})
                reply = await stream_chat(session, base_url, model, history, max_tokens, ignore_eos=False)
                history.append({"role": "assistant", "content": reply.text})
                usage[user].append(
                    {
                        "prompt_tokens": reply.prompt_tokens,
                        "cached_tokens": reply.cached_tokens,
                        "completion_tokens": reply.tokens,
                    }
                )

    with_session(chat)
    return usage


def cached_share(usage: list[list[dict]]) -> dict:
    """Of every prompt after each conversation's first, the share the server had cached: the smallest, and
    over all of them. A prompt's new question can come from no cache, so next to it the share of the history
    (the previous turn's prompt and answer, which the server computed but for the answer's last token): what
    a cache could have held."""
    later = [turn for conversation in usage for turn in conversation[1:]]
    history = [
        earlier["prompt_tokens"] + earlier["completion_tokens"]
        for conversation in usage
        for earlier in conversation[:-1]
    ]
    shares = [turn["cached_tokens"] / turn["prompt_tokens"] for turn in later]
    of_history = [turn["cached_tokens"] / held for turn, held in zip(later, history, strict=True)]
    return {
        "turns": usage,
        "min_cached_share": round(min(shares), 3),
        "cached_share": round(sum(t["cached_tokens"] for t in later) / sum(t["prompt_tokens"] for t in later), 3),
        "min_history_share": round(min(of_history), 3),
        "history_share": round(sum(t["cached_tokens"] for t in later) / sum(history), 3),
    }


# A chat as the alternating users hold it: a system prompt, short questions (a sentence or two) and answers.
CHAT_SYSTEM = (
    "You are a helpful and knowledgeable assistant. The user quotes passages from encyclopedia articles and asks "
    "about them: answer accurately and briefly, in plain sentences, and say so when the passage does not tell."
)
CHAT_TURNS, CHAT_QUESTION_CHARS, CHAT_ANSWER_TOKENS = 5, 120, 64


def chats_served(flags: list[str], log_path: Path) -> dict:
    """Two users alternating ``CHAT_TURNS``-turn chats with a server started with ``flags``: how much of
    their prompts came from its caches (``cached_share``)."""
    text, size = heldout_text(), CHAT_QUESTION_CHARS
    questions = [text[i : i + size] for i in range(0, 2 * CHAT_TURNS * size, size)]
    server = ServerProcess(flags, {}, log_path)
    try:
        server.wait_ready(3600)
        usage = alternating_chats(server.base_url, SERVED_NAME, CHAT_SYSTEM, questions, CHAT_TURNS, CHAT_ANSWER_TOKENS)
        return cached_share(usage)
    finally:
        server.stop()

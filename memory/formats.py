"""How experience turns into prompts: one place, shared by consolidation, the gate, serving and the demo.

An episode is a user's request (``context``), the agent's actions, and after each action the
environment's answer (``observation``). Two questions are asked of a model about it:

  * **policy** — "what to do": the chat is the request (optionally after the user's notes),
    the assistant's reply is the action;
  * **world model** — "what will happen": the chat shows the request and an action, and the
    assistant's reply is what the environment answers.

Training examples (consolidation), held-out checks (the gate), serving (notes in context) and
the demo all build their chats here, so a prompt seen in training is exactly the prompt asked
at serving time.
"""

from __future__ import annotations

WORLD_SYSTEM = ("You predict the environment. Given a request and the agent's action, "
                "answer exactly what the environment replies.")
NOTES_HEADER = "Notes from earlier sessions with this user:"


def notes_block(notes: list[str]) -> str:
    return NOTES_HEADER + "\n" + "\n".join(f"- {n}" for n in notes)


def policy_messages(context: str, notes: list[str] | None = None) -> list[dict]:
    """The chat whose assistant reply is the agent's action."""
    msgs: list[dict] = []
    if notes:
        msgs.append({"role": "system", "content": notes_block(notes)})
    msgs.append({"role": "user", "content": context})
    return msgs


def world_messages(context: str, action: str) -> list[dict]:
    """The chat whose assistant reply is the environment's answer to ``action``."""
    return [{"role": "system", "content": WORLD_SYSTEM},
            {"role": "user", "content": f"Request: {context}\nAgent action: {action}\nEnvironment reply:"}]


def render_prompt(tokenizer, messages: list[dict]) -> str:
    """The text a model sees before its reply (the chat template with the generation prompt).

    A tokenizer without a chat template gets a plain "role: content" layout.
    """
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "


def reply_end(tokenizer) -> str:
    """The text that closes an assistant reply, so a trained model learns to stop.

    For ChatML-style templates this is the end-of-turn marker; otherwise the EOS token.
    """
    if getattr(tokenizer, "chat_template", None):
        probe = tokenizer.apply_chat_template([{"role": "user", "content": "x"}, {"role": "assistant", "content": "Y"}],
                                              tokenize=False)
        tail = probe[probe.rfind("Y") + 1:]
        end = tail.strip("\n")
        if end:
            return end
    return tokenizer.eos_token or "\n"


def example_segments(tokenizer, messages: list[dict], reply: str, weight: float) -> list[dict]:
    """A ``segments`` record body (train/data.py): prompt at weight 0, the reply (and its end) at ``weight``."""
    return [{"text": render_prompt(tokenizer, messages), "weight": 0.0},
            {"text": reply + reply_end(tokenizer), "weight": float(weight)}]

"""How a prompt row becomes the token ids the policy sees: the one place prompts are formatted.

Rollouts, evaluation, the offline trajectory cache (pool and influence targets) and re-sampling
all encode prompts through :class:`PromptEncoder`, so the policy is trained and scored on the
format its behaviour samples were drawn in, and the cache records that format in its
fingerprint (a cache built with another format is refused, not silently reused).

Formats:

- ``chat``: the tokenizer's chat template with an optional system message and one user message
  (the row's prompt), ending in the assistant turn header (``add_generation_prompt``). The
  rendered text is tokenised without added special tokens, as ``apply_chat_template`` does: the
  template already writes whatever BOS the model expects.
- ``plain``: the prompt text (after the system prompt and a blank line, if one is set), with the
  BOS token the tokenizer adds by itself (``add_special_tokens``), if any, and never an EOS.
- ``auto``: ``chat`` when the tokenizer has a chat template, else ``plain``.

Either way a doubled BOS at the start (a template or a prompt that writes BOS itself on top of
the one added) is collapsed to one.
"""

from __future__ import annotations

import hashlib
from typing import Any, Literal

PromptFormat = Literal["auto", "chat", "plain"]
PROMPT_FORMATS = ("auto", "chat", "plain")


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _added_bos(tokenizer: Any) -> list[int]:
    """``[bos]`` if encoding with special tokens prepends BOS, else ``[]``."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    with_specials = tokenizer("1")["input_ids"]
    bare = tokenizer("1", add_special_tokens=False)["input_ids"]
    return [bos] if with_specials[:1] == [bos] and bare[:1] != [bos] else []


class PromptEncoder:
    """Formats and tokenises prompts for one tokenizer; ``fingerprint()`` names the format.

    Args:
        tokenizer: the policy's HF tokenizer.
        prompt_format: ``auto``, ``chat`` or ``plain`` (module docstring).
        system_prompt: a system message (chat) or a preamble line (plain); None: none.
    """

    def __init__(
        self, tokenizer: Any, prompt_format: PromptFormat = "auto", system_prompt: str | None = None
    ) -> None:
        if prompt_format not in PROMPT_FORMATS:
            raise ValueError(
                f"prompt_format must be one of {PROMPT_FORMATS}, got {prompt_format!r}"
            )
        template = getattr(tokenizer, "chat_template", None)
        if prompt_format == "chat" and not template:
            name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
            raise ValueError(
                f"prompt_format='chat' but the tokenizer {name!r} has no chat template; "
                "use prompt_format 'plain' (or 'auto', which falls back to it)"
            )
        self.tokenizer = tokenizer
        self.format: Literal["chat", "plain"] = (
            "chat" if prompt_format == "chat" or (prompt_format == "auto" and template) else "plain"
        )
        self.system_prompt = system_prompt or None
        self._template = template if self.format == "chat" else None
        self._bos = _added_bos(tokenizer) if self.format == "plain" else []

    def text(self, prompt: str) -> str:
        """The prompt as the policy reads it, before tokenisation (BOS excluded in plain)."""
        if self.format == "plain":
            return f"{self.system_prompt}\n\n{prompt}" if self.system_prompt else prompt
        messages = [{"role": "user", "content": prompt}]
        if self.system_prompt:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        try:
            return self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False
            )
        except Exception as error:  # jinja raises its own errors (e.g. "no system role")
            hint = " (does the template accept a system message?)" if self.system_prompt else ""
            raise ValueError(
                f"the chat template failed on prompt {prompt[:80]!r}{hint}: {error}"
            ) from error

    def encode(self, prompt: str) -> list[int]:
        """Token ids of one prompt, ready for generation."""
        ids = self._bos + self.tokenizer(self.text(prompt), add_special_tokens=False)["input_ids"]
        bos = self.tokenizer.bos_token_id
        if bos is not None and ids[:2] == [bos, bos]:
            ids = ids[1:]
        return ids

    def encode_rows(self, rows: list[dict[str, Any]]) -> list[list[int]]:
        """Token ids of each row's ``prompt``."""
        return [self.encode(row["prompt"]) for row in rows]

    def fingerprint(self) -> str:
        """A readable identity of the format, e.g. ``plain``, ``plain+bos``,
        ``chat:<template hash>+system:<hash>``; equal strings mean equal token ids."""
        base = f"chat:{_short_hash(self._template)}" if self._template else "plain"
        if self._bos:
            base += "+bos"
        if self.system_prompt:
            base += f"+system:{_short_hash(self.system_prompt)}"
        return base

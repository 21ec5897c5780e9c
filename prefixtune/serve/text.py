"""Generated tokens -> text that is safe to send, with OpenAI's ``stop`` strings.

Text is decoded from all of a request's tokens each time (byte-level BPE may only form a
character once several tokens are in), and two kinds of tail are held back until the
next token settles them: an incomplete UTF-8 character (decoded as U+FFFD) and a tail
that could be the start of a stop string. So a streamed answer never shows a piece of
a stop string, and never a broken character.
"""

from __future__ import annotations


class TextStream:
    """The text of one generation, released piece by piece.

    Args:
        tokenizer: The base model's tokenizer.
        stop: Strings that end the generation (not included in the text).
    """

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.tokens: list[int] = []
        self.sent = 0  # characters of the text already released
        self.text = ""  # the released text
        self.stopped = False  # a stop string was found

    def push(self, token: int) -> str:
        """Add one generated token; return the newly releasable text (may be empty)."""
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        cut = self._stop_at(text)
        if cut is not None:
            self.stopped = True
            return self._release(text[:cut], len(text[:cut]))
        end = len(text.rstrip("\ufffd"))
        end -= self._partial_stop(text[:end])
        return self._release(text, end)

    def flush(self) -> str:
        """The generation ended for another reason: release whatever was held back."""
        if self.stopped or not self.tokens:
            return ""
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        return self._release(text, len(text))

    def _release(self, text: str, end: int) -> str:
        if end <= self.sent:
            return ""
        piece = text[self.sent:end]
        self.sent = end
        self.text += piece
        return piece

    def _stop_at(self, text: str) -> int | None:
        found = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        return min(found) if found else None

    def _partial_stop(self, text: str) -> int:
        """Length of the longest tail of ``text`` that begins some stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best

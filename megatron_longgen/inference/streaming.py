"""Streaming text out of `generate()` with any project tokenizer (SentencePiece or HF), and stop strings.

`TextStreamer` (transformers' streamer interface: `put(ids)`, `end()`) decodes the generated ids so far
and writes only the new text. It holds back (a) text that could still become a stop string, (b) an
incomplete multi-byte character (decoded as U+FFFD until its last byte arrives); at the end the text is
cut before the first stop string. `StopOnStrings` ends generation once every row's text contains one.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
from transformers import StoppingCriteria
from transformers.generation.streamers import BaseStreamer


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """(text before the first stop string, whether one was found)."""
    hits = [text.index(s) for s in stops if s in text]
    return (text[: min(hits)], True) if hits else (text, False)


class TextStreamer(BaseStreamer):
    """Writes the generated text of a single row to `out` as it is produced (the prompt is skipped)."""

    def __init__(self, tokenizer, *, stops: Sequence[str] = (), out=None):
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.out = out if out is not None else sys.stdout
        self.ids: list[int] = []
        self.written = 0
        self.prompt_seen = False
        self.text = ""

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first passes the prompt
            self.prompt_seen = True
            return
        if value.dim() > 1 and value.shape[0] > 1:
            raise ValueError("TextStreamer streams one row; generate() was given a batch")
        self.ids += value.reshape(-1).tolist()
        self._flush(final=False)

    def end(self) -> None:
        self._flush(final=True)
        self.out.write("\n")
        self.out.flush()

    def _flush(self, *, final: bool) -> None:
        text = self.tokenizer.decode(self.ids)
        text, stopped = cut_at_stop(text, self.stops)
        self.text = text
        ready = len(text)
        if not final and not stopped:
            if text.endswith("\ufffd"):
                ready = len(text.rstrip("\ufffd"))
            hold = max((len(s) - 1 for s in self.stops), default=0)
            ready = min(ready, len(text) - hold)
        if ready > self.written:
            self.out.write(text[self.written : ready])
            self.out.flush()
            self.written = ready


class StopOnStrings(StoppingCriteria):
    """Stop when each row's generated text (after `prompt_len` tokens) contains one of `stops`."""

    def __init__(self, tokenizer, stops: Sequence[str], *, prompt_len: int):
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.prompt_len = prompt_len

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        done = [
            cut_at_stop(self.tokenizer.decode(row[self.prompt_len :].tolist()), self.stops)[1]
            for row in input_ids
        ]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

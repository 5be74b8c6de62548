"""Passkey and needle-in-a-haystack samples as token ids, with the answer span marked.

Every sample is exactly `length` tokens: `<bos>` + instruction + body (filler or haystack with the needles)
+ question, then the answer tokens. A model "retrieves" when greedy decoding after the prompt produces the
answer; `scoring.py` checks that either from generated text or from one teacher-forced forward.

Formats (evaluation only: the project's training data must not use this phrasing; the SmolLM2 example's
synthetic retrieval documents are key-value records in another wording):

- `passkey`, the LongLoRA / Landmark-Attention test: a repeated filler (`PASSKEY_FILLER`) with one needle
  "The pass key is 47291. Remember it. 47291 is the pass key." at the requested depth, then "What is the
  pass key? The pass key is" -> " 47291" (5 digits).
- `niah_single`, `niah_multikey`, `niah_multivalue`, RULER's needle-in-a-haystack with its phrasing
  ("One of the special magic numbers for {key} is: {value}."), on the shipped natural-text haystack (GNU
  manual prose, `haystack.py`): one needle; several needles with different keys, one asked; several values
  for one key, all asked. Keys are word pairs ("amber-falcon"), values 7-digit numbers.

Depth is where the (first) needle sits in the body: 0 = right after the instruction, 1 = right before the
question. Needles go in at a sentence boundary of the haystack (the nearest one before the target).
"""

from __future__ import annotations

import bisect
import functools
import random
from dataclasses import dataclass
from typing import Protocol

PASSKEY_INSTRUCTION = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there."
)
PASSKEY_FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_NEEDLE = " The pass key is {value}. Remember it. {value} is the pass key."
PASSKEY_QUESTION = " What is the pass key? The pass key is"

NIAH_INSTRUCTION = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the numbers afterwards.\n"
)
NIAH_NEEDLE = " One of the special magic numbers for {key} is: {value}."
NIAH_QUESTION = (
    "\nWhat is the special magic number for {key} mentioned in the provided text? "
    "The special magic number for {key} mentioned in the provided text is"
)
NIAH_QUESTION_ALL = (
    "\nWhat are all the special magic numbers for {key} mentioned in the provided text? "
    "The special magic numbers for {key} mentioned in the provided text are"
)
_KEY_WORDS = (
    ("amber", "brisk", "calm", "dusty", "eager", "faint", "gentle", "hollow", "ivory", "jolly", "keen", "lunar",
     "misty", "noble", "olive", "proud", "quiet", "rustic", "silver", "tidal", "urban", "vivid", "woolen", "young"),
    ("anchor", "bridge", "canyon", "dolphin", "ember", "falcon", "garden", "harbor", "island", "jacket", "kettle",
     "lantern", "meadow", "needle", "orchard", "pepper", "quarry", "river", "saddle", "tunnel", "valley", "willow"),
)  # fmt: skip
TASKS = ("passkey", "niah_single", "niah_multikey", "niah_multivalue")


class TextTokenizer(Protocol):
    """What the builders need (`megatron_longgen.data.tokenizers.Tokenizer` has it)."""

    bos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


@dataclass(frozen=True)
class RetrievalSample:
    """One prompt + answer, `length` tokens in all."""

    task: str
    length: int
    depth: float
    prompt_ids: tuple[int, ...]
    answer_ids: tuple[int, ...]
    """The answer tokens teacher forcing checks (for multivalue: the values in needle order)."""
    values: tuple[str, ...]
    """The strings a generated answer must contain (one, or every value for multivalue)."""

    @property
    def input_ids(self) -> list[int]:
        return list(self.prompt_ids) + list(self.answer_ids)

    @property
    def answer_logit_positions(self) -> range:
        """Positions of `input_ids` whose next-token logits predict the answer tokens."""
        start = len(self.prompt_ids) - 1
        return range(start, start + len(self.answer_ids))


def _split_prompt_answer(tok: TextTokenizer, question: str, answer: str) -> tuple[list[int], list[int]]:
    """Tokens of `question` and of `answer` as they come out of tokenizing both together."""
    joint = tok.encode(question + answer)
    alone = tok.encode(question)
    common = 0
    while common < min(len(joint), len(alone)) and joint[common] == alone[common]:
        common += 1
    if common == len(joint):
        raise ValueError(f"answer {answer!r} adds no token after {question!r}")
    return joint[:common], joint[common:]


@functools.cache
def _haystack_ids(tok: TextTokenizer) -> tuple[list[int], list[int]]:
    """(haystack token ids, indices of the tokens that end a sentence), computed once per tokenizer.

    A sentence ends at a token whose text ends with . ? or ! and is followed by whitespace (so "e.g." and
    ".exe" are not boundaries)."""
    from megatron_longgen.evaluation.haystack import haystack_text

    ids = tok.encode(haystack_text())
    text = {t: tok.decode([t]) for t in set(ids)}
    ends = []
    for i in range(len(ids) - 1):
        if text[ids[i]].rstrip(" ").endswith((".", "?", "!")):
            head = tok.decode([ids[i]])
            pair = tok.decode([ids[i], ids[i + 1]])
            if pair[len(head) : len(head) + 1].isspace():
                ends.append(i)
    return ids, ends


def _insert_at_depths(
    body: list[int], needles: list[list[int]], depths: list[float], boundaries: list[int]
) -> list[int]:
    """Insert needles into body at depth fractions, each right after the sentence boundary nearest to its
    target (the body's start counts as one)."""
    starts = [0] + [b + 1 for b in boundaries]  # where a sentence may begin
    points = []
    for depth in depths:
        target = round(depth * len(body))
        k = bisect.bisect_left(starts, target)
        near = [starts[j] for j in (k - 1, k) if 0 <= j < len(starts)]
        points.append(min(near, key=lambda p: abs(p - target)))
    order = sorted(range(len(needles)), key=lambda i: points[i])
    out, last = [], 0
    for i in order:
        out += body[last : points[i]] + needles[i]
        last = points[i]
    return out + body[last:]


def _key(rng: random.Random, taken: set[str]) -> str:
    while True:
        key = f"{rng.choice(_KEY_WORDS[0])}-{rng.choice(_KEY_WORDS[1])}"
        if key not in taken:
            taken.add(key)
            return key


def build_sample(
    tok: TextTokenizer, *, task: str, length: int, depth: float, seed: int, num_needles: int = 4
) -> RetrievalSample:
    """One sample of `task` (`TASKS`), exactly `length` tokens, its (first) needle at `depth` in [0, 1]."""
    if task not in TASKS:
        raise ValueError(f"unknown retrieval task {task!r}; choose from {TASKS}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    rng = random.Random(f"{seed}-{task}-{length}-{depth}")
    if task == "passkey":
        values = [str(rng.randint(10000, 99999))]
        needles = [tok.encode(PASSKEY_NEEDLE.format(value=values[0]))]
        head = [tok.bos_id, *tok.encode(PASSKEY_INSTRUCTION)]
        question, answer = _split_prompt_answer(tok, PASSKEY_QUESTION, " " + values[0])
        depths = [depth]
    else:
        count = 1 if task == "niah_single" else num_needles
        taken: set[str] = set()
        keys = (
            [_key(rng, taken)] * count
            if task == "niah_multivalue"
            else [_key(rng, taken) for _ in range(count)]
        )
        values = [str(rng.randint(1_000_000, 9_999_999)) for _ in range(count)]
        needles = [tok.encode(NIAH_NEEDLE.format(key=k, value=v)) for k, v in zip(keys, values)]
        head = [tok.bos_id, *tok.encode(NIAH_INSTRUCTION)]
        template = NIAH_QUESTION_ALL if task == "niah_multivalue" else NIAH_QUESTION
        asked = " " + ", ".join(values) if task == "niah_multivalue" else " " + values[0]
        question, answer = _split_prompt_answer(tok, template.format(key=keys[0]), asked)
        depths = [depth] + [rng.random() for _ in range(count - 1)]
        if task == "niah_multikey":
            values = values[:1]  # distractors are not asked
    fixed = len(head) + len(question) + len(answer) + sum(len(n) for n in needles)
    body_len = length - fixed
    if body_len < 0:
        raise ValueError(
            f"length {length} is too short for a {task} sample: its fixed parts need {fixed} tokens"
        )
    if task == "passkey":
        unit = tok.encode(PASSKEY_FILLER)
        body = (unit * (body_len // len(unit) + 1))[:body_len]
        boundaries = list(range(len(unit) - 1, body_len, len(unit)))
    else:
        hay, ends = _haystack_ids(tok)
        if body_len > len(hay):
            raise ValueError(f"length {length} needs {body_len} haystack tokens; the haystack has {len(hay)}")
        # The body starts after a sentence end, at a random place that leaves room for it.
        last = bisect.bisect_right(ends, len(hay) - body_len - 1)
        start = ends[rng.randrange(last)] + 1 if last > 0 else 0
        body = hay[start : start + body_len]
        lo = bisect.bisect_left(ends, start)
        boundaries = [e - start for e in ends[lo:] if e - start < body_len]
    prompt = head + _insert_at_depths(body, needles, depths, boundaries) + question
    assert len(prompt) + len(answer) == length
    return RetrievalSample(task, length, depth, tuple(prompt), tuple(answer), tuple(values))


def build_samples(
    tok: TextTokenizer,
    *,
    task: str,
    lengths: list[int],
    depths: list[float],
    num_samples: int = 1,
    seed: int = 1234,
    num_needles: int = 4,
) -> list[RetrievalSample]:
    """`num_samples` samples per (length, depth), reproducible from `seed`."""
    return [
        build_sample(
            tok, task=task, length=length, depth=depth, seed=seed * 1000 + i, num_needles=num_needles
        )
        for length in lengths
        for depth in depths
        for i in range(num_samples)
    ]

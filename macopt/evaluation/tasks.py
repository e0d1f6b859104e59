"""Deterministic RULER-style retrieval tasks over real filler text (pure functions of a seed).

Tasks are built in token space so that the prompt has exactly the requested length and the
needle sits at the requested depth whatever the tokenizer: the caller passes ``encode`` (text
to token ids: a tokenizer, or UTF-8 bytes) and the filler's token ids (e.g. held-out files).
Pieces are encoded separately and concatenated, so the needle's tokens are the same in every
prompt and its position is known exactly.

Needles come in two styles: ``prose`` (RULER's wording: "The pass key is 12345. Remember it.")
for instruction and chat models, and ``code`` (a Python assignment the question repeats the
start of: ``PASS_KEY_12345 = True`` ... ``if PASS_KEY_``) for models trained on source code,
such as the tiny model in ``examples/tiny-lm``, which does not follow prose instructions.
A third, ``chat``, is the prose needle inside an instruct model's chat template (RULER's
instruction first, the question last, then the assistant turn opened and the answer's lead-in
given): pass ``chat=(before, after)``, the template's text around one user message
(:func:`chat_wrap`).

>>> encode = lambda text: list(text.encode())
>>> filler = encode("def f(x):\\n    return x + 1\\n" * 100)
>>> task = passkey(filler, encode, length=400, depth=0.5, seed=0)
>>> len(task.prompt_ids), task.answer in bytes(task.prompt_ids).decode()
(400, True)
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

Encode = Callable[[str], list[int]]

# Keys for multi-key retrieval: plain words, distinct, tokenized the same in any position.
_KEYS = ("apple", "river", "copper", "violet", "falcon", "marble", "cedar", "lantern", "harbor",
         "meadow", "quartz", "tiger", "willow", "ember", "glacier", "orchid", "pepper", "saddle",
         "thistle", "walnut", "zephyr", "basalt", "canyon", "dolphin")


@dataclass(frozen=True)
class Task:
    """One prompt: ``prompt_ids`` (exactly ``length`` ids) ends with the question; the model
    should continue with ``answer`` (text; ``answer_ids`` its tokens as the needle spells it).
    ``needle_start`` is the index of the first needle token, at ``depth`` of the filler."""

    kind: str
    prompt_ids: list[int]
    answer: str
    answer_ids: list[int]
    depth: float
    length: int
    seed: int
    needle_start: int
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "answer": self.answer, "depth": self.depth,
                "length": self.length, "seed": self.seed, "needle_start": self.needle_start,
                "style": self.extra.get("style", "prose")}


STYLES = ("prose", "code", "chat")

# RULER's instructions, stated before the haystack in the chat style.
_PASSKEY_INTRO = ("There is a pass key hidden inside a lot of irrelevant text. Find it and "
                  "memorize it. I will quiz you about the pass key.\n")
_MULTIKEY_INTRO = ("Some special magic numbers are hidden inside a lot of irrelevant text. Find "
                   "them and memorize them. I will quiz you about one of them.\n")


def passkey(filler_ids: Sequence[int], encode: Encode, *, length: int, depth: float,
            seed: int, digits: int = 5, style: str = "prose",
            chat: tuple[str, str] | None = None) -> Task:
    """A pass key (``digits`` digits) hidden at ``depth`` (0: start, 1: end) of ``length``
    tokens of filler; the question at the end asks for it (``style``, ``chat``: see the
    module)."""
    _check_style(style, chat)
    rng = random.Random(f"passkey/{seed}/{length}/{depth}")
    key = str(rng.randrange(10 ** (digits - 1), 10 ** digits))
    head = ""
    if style == "code":
        needle, question, answer = f"\nPASS_KEY_{key} = True\n", "\nif PASS_KEY_", key
    else:
        needle = f"\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
        question, answer = "\nWhat is the pass key? The pass key is", f" {key}"
    if style == "chat":
        head = chat[0] + _PASSKEY_INTRO
        question = (f"\nWhat is the pass key? Answer with the {digits}-digit number."
                    f"{chat[1]}The pass key is")
    prompt, start = _place(filler_ids, [encode(needle)], [depth], encode(question), length, rng,
                           encode(head) if head else [])
    return Task("passkey", prompt, key, encode(answer), depth, length, seed, start[0],
                extra={"style": style})


def multikey(filler_ids: Sequence[int], encode: Encode, *, length: int, depth: float,
             seed: int, keys: int = 4, digits: int = 7, style: str = "prose",
             chat: tuple[str, str] | None = None) -> Task:
    """``keys`` key-value pairs spread through the filler; the one asked for sits at
    ``depth``, the others at seeded random depths (``style``, ``chat``: see the module)."""
    _check_style(style, chat)
    if not 1 <= keys <= len(_KEYS):
        raise ValueError(f"multikey: keys must be in [1, {len(_KEYS)}], got {keys}")
    rng = random.Random(f"multikey/{seed}/{length}/{depth}/{keys}")
    names = rng.sample(_KEYS, keys)
    values = [str(rng.randrange(10 ** (digits - 1), 10 ** digits)) for _ in names]
    if style == "code":
        texts = [f"\n{k.upper()}_KEY_{v} = True\n" for k, v in zip(names, values, strict=True)]
        question, answer = f"\nif {names[0].upper()}_KEY_", values[0]
    else:
        texts = [f"\nThe special magic number for {k} is: {v}.\n"
                 for k, v in zip(names, values, strict=True)]
        question = (f"\nWhat is the special magic number for {names[0]}? "
                    f"The special magic number for {names[0]} is:")
        answer = f" {values[0]}"
    head = ""
    if style == "chat":
        head = chat[0] + _MULTIKEY_INTRO
        question = (f"\nWhat is the special magic number for {names[0]}?{chat[1]}"
                    f"The special magic number for {names[0]} is:")
    depths = [depth] + [rng.random() for _ in names[1:]]
    prompt, starts = _place(filler_ids, [encode(t) for t in texts], depths, encode(question),
                            length, rng, encode(head) if head else [])
    return Task("multikey", prompt, values[0], encode(answer), depth, length, seed,
                starts[0], extra={"keys": dict(zip(names, values, strict=True)), "style": style})


GENERATORS: dict[str, Callable[..., Task]] = {"passkey": passkey, "multikey": multikey}


def _check_style(style: str, chat: tuple[str, str] | None = None) -> None:
    if style not in STYLES:
        raise ValueError(f"tasks: unknown needle style {style!r}; known: {STYLES}")
    if style == "chat" and chat is None:
        raise ValueError("tasks: the chat style needs the chat template's text (chat=...)")


def chat_wrap(tokenizer) -> tuple[str, str]:
    """The text a tokenizer's chat template puts before and after one user message, the
    assistant turn opened (``add_generation_prompt``)."""
    marker = "\x00MACOPT\x00"
    text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False,
                                         add_generation_prompt=True)
    before, _, after = text.partition(marker)
    return before, after


def _place(filler_ids: Sequence[int], needles: list[list[int]], depths: list[float],
           question: list[int], length: int, rng: random.Random,
           head: Sequence[int] = ()) -> tuple[list[int], list[int]]:
    """``head``, then filler (cycled from a seeded offset) with each needle inserted at its
    depth of the filler, then the question; exactly ``length`` ids. Returns the ids and needle
    starts."""
    if not filler_ids:
        raise ValueError("tasks: the filler is empty; pass some real text")
    if any(not 0.0 <= d <= 1.0 for d in depths):
        raise ValueError(f"tasks: depths must be in [0, 1], got {depths}")
    n_filler = length - len(head) - len(question) - sum(len(n) for n in needles)
    if n_filler < 0:
        raise ValueError(f"tasks: length {length} is too short for the needles and question "
                         f"({length - n_filler} tokens)")
    offset = rng.randrange(len(filler_ids))
    filler = [filler_ids[(offset + i) % len(filler_ids)] for i in range(n_filler)]
    cuts = sorted((round(d * n_filler), i) for i, d in enumerate(depths))
    prompt: list[int] = list(head)
    starts = [0] * len(needles)
    previous = 0
    for cut, i in cuts:
        prompt += filler[previous:cut]
        starts[i] = len(prompt)
        prompt += needles[i]
        previous = cut
    prompt += filler[previous:] + question
    assert len(prompt) == length
    return prompt, starts


def make_tasks(filler_ids: Sequence[int], encode: Encode, *, kinds: Sequence[str],
               lengths: Sequence[int], depths: Sequence[float], seed: int,
               samples: int = 1, style: str = "prose",
               chat: tuple[str, str] | None = None) -> list[Task]:
    """Every (kind, length, depth, sample) combination, in that order; sample ``s`` uses seed
    ``seed + s``."""
    unknown = set(kinds) - set(GENERATORS)
    if unknown:
        raise ValueError(f"tasks: unknown kinds {sorted(unknown)}; known: {sorted(GENERATORS)}")
    return [GENERATORS[k](filler_ids, encode, length=n, depth=d, seed=seed + s, style=style,
                          chat=chat)
            for k in kinds for n in lengths for d in depths for s in range(samples)]

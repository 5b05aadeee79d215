"""Key-value recall: where evicting the wrong token loses the answer.

A prompt lists `pairs` lines `name word`, then names one of them again; the answer is its word
(copying the token that followed the name's earlier occurrence: what induction heads do). The asked line sits anywhere in the prompt, so a cache that keeps
a quarter of the tokens must keep that one line among the rest, decided before or when the question
is read, depending on the eviction schedule. Names and words are single tokens of kvtrain-ref's
tokenizer (a line is 3 tokens: name, " word", newline); the names in a prompt are distinct.

With `needle`, the asked line is always named NEEDLE and holds one of NEEDLE_WORDS, a set no other
line uses: a needle in a haystack, which a model finds by what it is and must still keep. Its prompt
is the haystack alone, and the completion asks and answers (`target word`): the question tells
nothing, so a cache compressed at the end of the prompt decides without it (kvpress's setting of a
context compressed ahead of the questions), and the answer is read over what survived.

Train, validation and test prompts are disjoint by construction: a hash of the prompt decides its
split, as for the arithmetic task, and a draw for a split keeps only that split's prompts.
"""

from __future__ import annotations

import random

from kvtrain.data.corpus import SPLITS, split_of

from .arithmetic import HELD_OUT_PERCENT, Problem

NAMES = """
act action app append archive attr aut back base before byte calls can chunk clear closed col comp
compat compile content count decode deta diff dis dist domain done encode ensure error escape exc
exists ext field fields fin fix form future get getattr hand host http imp index input inst install
int its keys kwargs kwds label lat left length library limit lineno loader locale locals mark net
non normal opt other our pack param part pick pla place policy pop port pri pro process quote range
ref right root round row running safe script seconds see simple size spec speci special src stack
std stderr str sys termin the token top tra typ url use values verbose wait waiter week width
win work wrapper writ
""".split()
NEEDLE = "target"  # the name a needle prompt always asks (in no other line)
# the needle's words, which no other line uses: the needle is found by what it is, not by matching names
NEEDLE_WORDS = """
block body buffer cont convert copy create data defined filter float indent inter lin max offset open
option pipe point pos present replace sep sort source stop string strings text tree tri
""".split()
WORDS = """
add addr address all allow ans ass auth bit bound buf bytes cache char child classes close com
command comple config contain context control cor cre current date day dir div element empty end ent
enum errors execut extra files final first format frame full fut handle has hash here ignore include
insert item items iter join just key level lib like list load logger low mail main make man manager
map member methods min module month most msg multip node now object objects off one only options
order over package par parse path per pid queue quot reader reg release remo remove repr request
reset search send set sha show sock static stream sup tag thread trace und until user valid value
vari wrap writer xml zip
""".split()


def make_recall(rng: random.Random, pairs: int, queries: int = 1, needle: bool = False) -> Problem:
    names = rng.sample(NAMES, pairs)
    words = [rng.choice(WORDS) for _ in names]
    asked = rng.sample(range(pairs), queries)
    if needle:
        names[asked[0]], words[asked[0]] = NEEDLE, rng.choice(NEEDLE_WORDS)
    haystack = "".join(f"{name} {word}\n" for name, word in zip(names, words))
    # further queries (multi-query recall, Zoology's MQAR) give training more answers per prompt
    questions = "\n".join(f"{names[i]} {words[i]}" for i in asked)
    if needle:  # the question carries nothing: asked after the prompt, as of a cache compressed ahead of it
        return Problem(prompt=haystack, answer=words[asked[0]], solution=questions)
    return Problem(prompt=haystack + names[asked[0]], answer=words[asked[0]],
                   solution=questions[len(names[asked[0]]):])


def recall_problems(n: int, seed: int = 0, split: str = "train", pairs: int = 48, queries: int = 1,
                    needle: bool = False) -> list[Problem]:
    """`n` recall prompts of one split ("train", "val" or "test") with `pairs` lines each,
    deterministic in `seed`; the solution answers `queries` names (the first is the prompt's).
    `needle`: the asked line is always named NEEDLE and its word is one of NEEDLE_WORDS, which no
    other line uses (a needle in a haystack: what to find is known, where it is is not; a model
    needs no name matching, which kvtrain-ref cannot learn in a short fine-tune, only to keep it);
    the prompt is the haystack, the solution `NEEDLE word`."""
    if n < 1:
        raise ValueError(f"need at least one problem, got n={n}")
    if not 1 <= pairs <= len(NAMES):
        raise ValueError(f"pairs must be in 1..{len(NAMES)} (the distinct names), got {pairs}")
    if not 1 <= queries <= pairs:
        raise ValueError(f"queries must be in 1..pairs ({pairs}), got {queries}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng, problems = random.Random(seed), []
    while len(problems) < n:
        problem = make_recall(rng, pairs, queries, needle)
        if split_of(problem.prompt, HELD_OUT_PERCENT) == split:
            problems.append(problem)
    return problems

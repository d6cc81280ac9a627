"""Writes the small fine-tuning sets shipped beside this script (deterministic; no downloads).

    python examples/finetune/make_examples.py

topics_{train,val}.jsonl: one-sentence news snippets labelled sports / science / cooking, built from
templates and word lists, so a small model can learn them in a minute on a CPU.
alpaca_{train,val}.jsonl: Alpaca-format instructions of a few kinds (colors, opposites, arithmetic,
plurals, capitals), with and without an input. Topic validation rows never repeat training rows; the
instruction kinds are few, so some validation instructions do (most additions are new).
topics_choice.jsonl: multiple choice (launch/eval.py --task choice): a sentence's start and three endings,
one from each topic; the right one belongs to the start's topic.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent

TOPICS = {
    "sports": {
        "subject": [
            "The striker",
            "The home team",
            "Our goalkeeper",
            "The young sprinter",
            "The captain",
            "The visiting side",
        ],
        "verb": ["scored twice in", "won", "lost", "dominated", "was injured during", "celebrated after"],
        "object": [
            "the cup final",
            "the derby",
            "the relay race",
            "the second half",
            "the league match",
            "the tennis semifinal",
        ],
    },
    "science": {
        "subject": [
            "The researchers",
            "A new telescope",
            "The laboratory",
            "Physicists",
            "The chemistry team",
            "A biologist",
        ],
        "verb": [
            "measured",
            "discovered",
            "published a study on",
            "observed",
            "simulated",
            "tested a theory about",
        ],
        "object": [
            "a distant galaxy",
            "the new enzyme",
            "quantum particles",
            "ocean bacteria",
            "the gene sequence",
            "a cooling crystal",
        ],
    },
    "cooking": {
        "subject": ["The chef", "My grandmother", "The bakery", "The recipe", "Our kitchen", "The cook"],
        "verb": ["roasted", "baked", "simmered", "seasoned", "served", "whisked"],
        "object": [
            "the garlic bread",
            "a lemon tart",
            "the tomato soup",
            "fresh pasta",
            "the onion sauce",
            "a chocolate cake",
        ],
    },
}
ENDINGS = ["yesterday.", "on Sunday.", "this morning.", "with great care.", "after a long week.", "again."]

COLORS = {
    "banana": "yellow",
    "grass": "green",
    "snow": "white",
    "coal": "black",
    "sky": "blue",
    "tomato": "red",
    "carrot": "orange",
    "plum": "purple",
}
OPPOSITES = {
    "hot": "cold",
    "big": "small",
    "up": "down",
    "fast": "slow",
    "light": "dark",
    "happy": "sad",
    "open": "closed",
    "early": "late",
    "loud": "quiet",
    "full": "empty",
}
PLURALS = {
    "cat": "cats",
    "box": "boxes",
    "child": "children",
    "mouse": "mice",
    "city": "cities",
    "leaf": "leaves",
    "foot": "feet",
    "bus": "buses",
}
CAPITALS = {
    "France": "Paris",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Japan": "Tokyo",
    "Egypt": "Cairo",
    "Peru": "Lima",
    "Kenya": "Nairobi",
    "Norway": "Oslo",
}


def topic_rows(n: int, rng: random.Random) -> list[dict]:
    rows = []
    for _ in range(n):
        label = rng.choice(sorted(TOPICS))
        words = TOPICS[label]
        text = f"{rng.choice(words['subject'])} {rng.choice(words['verb'])} {rng.choice(words['object'])} {rng.choice(ENDINGS)}"
        rows.append({"text": text, "label": label})
    return rows


def choice_rows(n: int, rng: random.Random) -> list[dict]:
    """HellaSwag-style: a topic's subject and verb, one object from each topic as the endings."""
    rows = []
    for _ in range(n):
        topics = sorted(TOPICS)
        label = rng.randrange(len(topics))
        words = TOPICS[topics[label]]
        suffix = rng.choice(ENDINGS)
        endings = [f"{rng.choice(TOPICS[t]['object'])} {suffix}" for t in topics]
        rows.append(
            {
                "context": f"{rng.choice(words['subject'])} {rng.choice(words['verb'])}",
                "endings": endings,
                "label": label,
            }
        )
    return rows


def alpaca_row(kind: int, rng: random.Random) -> dict:
    if kind == 0:
        thing = rng.choice(sorted(COLORS))
        return {
            "instruction": "What color is this?",
            "input": thing,
            "output": f"The {thing} is {COLORS[thing]}.",
        }
    if kind == 1:
        word = rng.choice(sorted(OPPOSITES))
        return {
            "instruction": f"Give the opposite of the word '{word}'.",
            "input": "",
            "output": OPPOSITES[word],
        }
    if kind == 2:
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        return {
            "instruction": "Add the two numbers.",
            "input": f"{a} and {b}",
            "output": f"{a} + {b} = {a + b}",
        }
    if kind == 3:
        noun = rng.choice(sorted(PLURALS))
        return {"instruction": "Write the plural of this noun.", "input": noun, "output": PLURALS[noun]}
    country = rng.choice(sorted(CAPITALS))
    return {
        "instruction": f"What is the capital of {country}?",
        "input": "",
        "output": f"The capital of {country} is {CAPITALS[country]}.",
    }


def alpaca_rows(n: int, rng: random.Random) -> list[dict]:
    return [alpaca_row(rng.randrange(5), rng) for _ in range(n)]


def write(name: str, rows: list[dict]) -> None:
    (HERE / name).write_text("".join(json.dumps(row) + "\n" for row in rows))


def unseen(rows: list[dict], train: list[dict], n: int) -> list[dict]:
    """The first `n` rows that are not training rows (so validation measures more than recall)."""
    seen = {json.dumps(r, sort_keys=True) for r in train}
    return [r for r in rows if json.dumps(r, sort_keys=True) not in seen][:n]


if __name__ == "__main__":
    rng = random.Random(2024)
    topics = topic_rows(600, rng)
    write("topics_train.jsonl", topics)
    write("topics_val.jsonl", unseen(topic_rows(300, rng), topics, 150))
    alpaca = alpaca_rows(400, rng)
    write("alpaca_train.jsonl", alpaca)
    write("alpaca_val.jsonl", alpaca_rows(20, rng))  # all five kinds; the additions are mostly new
    write("topics_choice.jsonl", choice_rows(60, rng))

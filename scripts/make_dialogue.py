"""Write the small dialogue set the dialogue recipe fine-tunes on: conversations with the assistant
of an imaginary bookshop, in the OpenAI ``messages`` format, generated from the templates below
with a fixed seed (so the file is reproducible and ours to license: CC0).

    python scripts/make_dialogue.py src/gptstack/assets/dialogue/bookshop.jsonl

The later turns depend on the earlier ones ("reserve it" means the book asked about before), so a
model has to read the whole conversation to answer them. Conversations are short enough for the
demo model's 128-token context.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

SYSTEM = "You are the assistant of Quill & Page, a bookshop."
BOOKS = {   # title: (price in pounds, copies in stock)
    "Emma": (7, 3), "Dracula": (6, 0), "Ulysses": (12, 2), "Middlemarch": (9, 1), "Persuasion": (5, 4),
    "Frankenstein": (6, 2), "Beloved": (10, 0), "Dune": (11, 5), "Rebecca": (8, 1), "Hamlet": (4, 6),
    "Walden": (7, 0), "Kidnapped": (5, 2),
}
HOURS = {"Monday": "9 to 6", "Tuesday": "9 to 6", "Wednesday": "9 to 8", "Thursday": "9 to 6",
         "Friday": "9 to 8", "Saturday": "10 to 5", "Sunday": "closed"}
GREETINGS = ["Hello!", "Hi.", "Good morning.", "Hey there."]
THANKS = ["Thanks!", "Thank you.", "Great, thanks.", "Perfect, thank you."]


def book_turns(rng: random.Random) -> list[dict]:
    title = rng.choice(list(BOOKS))
    price, stock = BOOKS[title]
    ask = rng.choice([f"Do you have {title}?", f"Is {title} in stock?", f"Have you got a copy of {title}?"])
    if stock:
        answer = f"Yes, we have {stock} {'copy' if stock == 1 else 'copies'} of {title} at {price} pounds."
        follow = rng.choice(["Can you reserve it for me?", "Please put one aside for me.", "Could you hold it?"])
        reply = f"Of course. {title} is reserved for you until Saturday."
    else:
        answer = f"Sorry, {title} is out of stock. We can order it in about a week."
        follow = rng.choice(["Please order it.", "Yes, order it for me.", "Could you order one?"])
        reply = f"Done. We will call you when {title} arrives."
    turns = [("user", ask), ("assistant", answer), ("user", follow), ("assistant", reply)]
    if rng.random() < 0.5:
        turns += [("user", "How much was it again?"), ("assistant", f"{title} is {price} pounds.")]
    return turns


def hours_turns(rng: random.Random) -> list[dict]:
    day = rng.choice(list(HOURS))
    ask = rng.choice([f"When are you open on {day}?", f"What are your hours on {day}?", f"Are you open on {day}?"])
    hours = HOURS[day]
    answer = f"On {day} we are closed." if hours == "closed" else f"On {day} we are open from {hours}."
    return [("user", ask), ("assistant", answer)]


def other_turns(rng: random.Random) -> list[dict]:
    return rng.choice([
        [("user", "Where are you?"), ("assistant", "We are at 12 Mill Lane, next to the bakery.")],
        [("user", "Can I return a book?"), ("assistant", "Yes, within 30 days with the receipt.")],
        [("user", "Do you sell gift cards?"), ("assistant", "Yes, from 10 to 100 pounds.")],
    ])


def conversation(rng: random.Random) -> dict:
    turns = [("user", rng.choice(GREETINGS)), ("assistant", "Hello, how can I help?")] if rng.random() < 0.4 else []
    turns += rng.choice([book_turns, book_turns, hours_turns, other_turns])(rng)
    if rng.random() < 0.5:
        turns += [("user", rng.choice(THANKS)), ("assistant", "You are welcome. Goodbye!")]
    return {"messages": [{"role": "system", "content": SYSTEM}] + [{"role": r, "content": c} for r, c in turns]}


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "src/gptstack/assets/dialogue/bookshop.jsonl")
    rng = random.Random(2026)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as f:
        for _ in range(600):
            f.write(json.dumps(conversation(rng)) + "\n")


if __name__ == "__main__":
    main()

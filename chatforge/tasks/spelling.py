"""SpellingBee: spell a word letter by letter, or count a letter in a word; synthetic, any size.

A language model sees tokens, not letters, so "how many r's in strawberry" is hard for it. These
conversations teach it to spell the word out first, count from the spelling, and (with the tool)
confirm with one line of Python. Examples are generated from an embedded word list by a generator
seeded with the example's index, so example i is the same on every run; the `test` split uses
other seeds than `train`.

Scored generatively: counting by the number after the last `####`, spelling by the last run of
single letters in the response.
"""

from __future__ import annotations

import random
import re

from chatforge.tasks.base import Task
from chatforge.tasks.gsm8k import answers_match, extract_answer

WORDS = """
apple banana cherry strawberry raspberry blueberry orange lemon melon grape peach pear plum mango
papaya coconut avocado tomato potato carrot onion garlic pepper cabbage lettuce spinach broccoli
cucumber pumpkin zucchini mushroom almond walnut peanut cashew butter cheese yogurt bread cookie
biscuit pancake waffle noodle spaghetti sandwich hamburger chocolate vanilla caramel cinnamon
elephant giraffe kangaroo penguin dolphin octopus squirrel rabbit hamster turtle tortoise crocodile
alligator butterfly dragonfly mosquito scorpion spider beetle caterpillar cheetah leopard jaguar
gorilla chimpanzee buffalo antelope flamingo peacock pelican ostrich parrot sparrow swallow falcon
mountain valley river ocean island desert forest jungle meadow volcano glacier canyon waterfall
balloon umbrella bicycle motorcycle airplane helicopter submarine rocket tractor scooter carriage
library hospital museum theater stadium airport station harbor bridge tunnel castle cottage palace
computer keyboard monitor printer speaker headphone telephone camera battery calculator telescope
microscope magnet pendulum thermometer compass hammer screwdriver scissors needle bottle kettle
teacher student doctor nurse farmer engineer scientist musician painter writer soldier sailor
pilot dentist plumber carpenter lawyer architect astronaut mechanic librarian journalist
happiness sadness kindness darkness brightness freedom wisdom courage patience honesty curiosity
beautiful wonderful terrible horrible possible impossible comfortable dangerous mysterious
necessary different important interesting excellent successful independent responsible
committee accommodate embarrass occurrence millennium parallel questionnaire rhythm recommend
mississippi tennessee massachusetts connecticut philadelphia california minnesota illinois
january february september november december wednesday saturday tomorrow yesterday afternoon
algorithm function variable parameter language sentence paragraph grammar vocabulary dictionary
triangle rectangle pentagon hexagon octagon cylinder sphere pyramid diamond circle parallelogram
yellow purple silver golden crimson scarlet violet turquoise magenta lavender
whisper thunder lightning hurricane tornado blizzard rainbow sunshine moonlight starlight
bookkeeper balloonist goddess address success possess assessment tattoo coffee toffee committee
""".split()
WORDS = sorted(set(WORDS))
ALPHABET = "abcdefghijklmnopqrstuvwxyz"
LETTER_RUN = re.compile(r"\b[a-zA-Z](?:\s*[-,]\s*[a-zA-Z]\b|\s+[a-zA-Z]\b)+")

COUNT_PROMPTS = (
    'How many times does the letter "{letter}" appear in the word "{word}"?',
    'How many {letter}\'s are in "{word}"?',
    'Count the letter {letter} in {word}.',
    'In the word "{word}", how many times does "{letter}" occur?',
)
SPELL_PROMPTS = (
    'Spell the word "{word}" letter by letter.',
    'How do you spell "{word}"? Give it one letter at a time.',
    'Spell out {word}.',
)


def spell(word: str) -> str:
    return "-".join(word)


def spelled_word(response: str) -> str | None:
    """The letters of the last letter-by-letter run in a response ("a-p-p-l-e" -> "apple")."""
    runs = LETTER_RUN.findall(response)
    return re.sub(r"[^a-zA-Z]", "", runs[-1]).lower() if runs else None


class SpellingBee(Task):
    name = "SpellingBee"
    eval_type = "generative"
    baseline = 0.0

    def __init__(self, size: int = 1000, split: str = "train", use_tool: bool = True,
                 kinds: tuple[str, ...] = ("count", "spell"), **slice_args):
        super().__init__(**slice_args)
        if split not in ("train", "test"):
            raise ValueError(f"SpellingBee split must be train or test, got {split!r}")
        if not kinds or set(kinds) - {"count", "spell"}:
            raise ValueError(f"SpellingBee kinds must be a non-empty subset of ('count', 'spell'), got {kinds!r}")
        self.size, self.use_tool, self.kinds = size, use_tool, tuple(kinds)
        self.seed_base = 0 if split == "train" else 10_000_000

    def num_examples(self) -> int:
        return self.size

    def get_example(self, index: int) -> dict:
        rng = random.Random(self.seed_base + index)
        word = rng.choice(WORDS)
        kind = rng.choice(self.kinds)
        if kind == "spell":
            prompt = rng.choice(SPELL_PROMPTS).format(word=word)
            return {"messages": [{"role": "user", "content": prompt},
                                 {"role": "assistant", "content": spell(word)}],
                    "kind": "spell", "word": word, "answer": word}
        # half the time a letter of the word, otherwise any letter (so 0 is a possible answer)
        letter = rng.choice(word) if rng.random() < 0.5 else rng.choice(ALPHABET)
        count = word.count(letter)
        prompt = rng.choice(COUNT_PROMPTS).format(letter=letter, word=word)
        positions = [str(i + 1) for i, c in enumerate(word) if c == letter]
        found = (f'"{letter}" is at position{"s" if count > 1 else ""} {", ".join(positions)}, so {count} '
                 f'time{"" if count == 1 else "s"}.') if count else f'"{letter}" does not appear, so 0 times.'
        parts = [{"type": "text", "text": f"Spelling {word}: {spell(word)}. {found}"}]
        if self.use_tool:
            parts[0]["text"] += " Checking with Python:"
            parts.append({"type": "python", "text": f"{word!r}.count({letter!r})"})
            parts.append({"type": "python_output", "text": str(count)})
        parts.append({"type": "text", "text": f"\n#### {count}"})
        return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": parts}],
                "kind": "count", "word": word, "letter": letter, "answer": str(count)}

    def evaluate(self, conversation: dict, response: str) -> bool:
        if conversation["kind"] == "spell":
            return spelled_word(response) == conversation["word"]
        return answers_match(extract_answer(response), conversation["answer"])

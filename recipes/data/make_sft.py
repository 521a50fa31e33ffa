"""Instruction-following examples (instruction -> response), written for jaxaccel.

Eight task families, each a hand-written instruction frame and a rule that computes the
response from the instruction's own content (sorting words, pulling out an email address,
writing a product line from its facts, past tense, the largest number, a shopping list as a
sentence, an antonym, initials). The test split uses the same families with fillers drawn so
that no test row's instruction is in training, and the antonym pairs of the test rows never
appear in training at all, so that family can only be passed by knowing the language.

`python -m recipes.data.make_lm_data` rewrites the files; the output is a pure function of SEED.
"""

from __future__ import annotations

import random

WORDS = ["lantern", "meadow", "copper", "saddle", "orchid", "harbour", "violin", "pebble", "thistle", "walnut",
         "glacier", "bramble", "falcon", "quartz", "ribbon", "cinder", "anchor", "juniper", "marble", "nectar",
         "plume", "tundra", "kettle", "ember", "zephyr", "yarrow", "basalt", "dune", "hazel", "iris"]
FIRST = ["Maren", "Tobiah", "Ilse", "Corin", "Yara", "Edvin", "Lucia", "Oren", "Saskia", "Anselm", "Noor", "Fabian",
         "Greta", "Idris", "Petra", "Rufus", "Selma", "Teodor", "Vesna", "Wilmer"]
LAST = ["Halloway", "Brenner", "Quist", "Navarro", "Oyelaran", "Lindgren", "Marchetti", "Castellan", "Dubois",
        "Eriksen", "Fairbank", "Gallo", "Hartig", "Iversen", "Kowalczyk", "Lorimer"]
DOMAINS = ["brightmail.example", "postbox.example", "quillnet.example", "harbourmail.example", "sundial.example"]
BRANDS = ["Tallowick", "Brisker", "Moonfield", "Ostra", "Quillon", "Varnel", "Heronsgate", "Ploverly"]
PRODUCTS = ["water bottle", "desk lamp", "rain jacket", "cutting board", "backpack", "teapot", "phone stand",
            "picnic blanket", "bread knife", "garden stool"]
MATERIALS = ["recycled steel", "oak", "bamboo", "waxed cotton", "cork", "stoneware", "aluminium", "linen"]
USES = ["long train journeys", "small kitchens", "morning runs", "camping trips", "home offices",
        "rainy commutes", "weekend markets", "balcony gardens"]
# (present, past) with the object a subject may act on
VERBS = [("opens", "opened"), ("repairs", "repaired"), ("paints", "painted"), ("sells", "sold"),
         ("builds", "built"), ("finds", "found"), ("carries", "carried"), ("writes", "wrote"),
         ("buys", "bought"), ("cleans", "cleaned"), ("brings", "brought"), ("draws", "drew"),
         ("keeps", "kept"), ("moves", "moved"), ("holds", "held"), ("wraps", "wrapped")]
OBJECTS = ["the old gate", "a wooden boat", "the blue door", "a letter to the council", "the village map",
           "a basket of apples", "the shop sign", "a small cabinet", "the garden fence", "a new kite"]
GROCERIES = ["milk", "eggs", "flour", "butter", "rice", "lemons", "onions", "honey", "oats", "cheese", "beans",
             "tomatoes", "spinach", "yoghurt", "pepper", "garlic"]
# antonym pairs: the last TEST_ANTONYMS only ever appear in the test split
ANTONYMS = [("hot", "cold"), ("early", "late"), ("heavy", "light"), ("wide", "narrow"), ("quiet", "loud"),
            ("shallow", "deep"), ("rough", "smooth"), ("ancient", "modern"), ("empty", "full"), ("tall", "short"),
            ("wet", "dry"), ("cheap", "expensive"), ("fast", "slow"), ("strong", "weak"), ("clean", "dirty"),
            ("happy", "sad"), ("open", "closed"), ("thick", "thin"), ("soft", "hard"), ("bright", "dark"),
            # test only
            ("rich", "poor"), ("brave", "cowardly"), ("generous", "stingy"), ("tight", "loose"),
            ("sharp", "blunt"), ("sweet", "sour"), ("young", "old"), ("first", "last")]
TEST_ANTONYMS = 8
TASKS = ("sort_words", "extract_email", "product_line", "past_tense", "largest_number", "shopping_sentence",
         "antonym", "initials")


def _sort_words(rnd, test):
    words = rnd.sample(WORDS, rnd.randint(3, 5))
    return f"Sort these words alphabetically: {', '.join(words)}.", ", ".join(sorted(words))


def _extract_email(rnd, test):
    first, last = rnd.choice(FIRST), rnd.choice(LAST)
    email = f"{first.lower()}.{last.lower()}@{rnd.choice(DOMAINS)}"
    day = rnd.choice(["Monday", "Tuesday", "Thursday", "Friday"])
    body = rnd.choice([f"Hi, this is {first} {last}. Please send the invoice to {email} before {day}.",
                       f"You can reach {first} at {email} if the delivery is late.",
                       f"Questions about the {day} meeting go to {email}, thanks!"])
    return f"Extract the email address from this message: {body}", email


def _product_line(rnd, test):
    brand, product, material, use = rnd.choice(BRANDS), rnd.choice(PRODUCTS), rnd.choice(MATERIALS), rnd.choice(USES)
    return (f"Write a one-sentence product description. Brand: {brand}. Product: {product}. "
            f"Material: {material}. Made for: {use}.",
            f"The {brand} {product} is made of {material} and designed for {use}.")


def _past_tense(rnd, test):
    name, (present, past), obj = rnd.choice(FIRST), rnd.choice(VERBS), rnd.choice(OBJECTS)
    return f"Rewrite this sentence in the past tense: {name} {present} {obj}.", f"{name} {past} {obj}."


def _largest_number(rnd, test):
    nums = rnd.sample(range(12, 980), rnd.randint(3, 4))
    return f"Which is the largest of these numbers: {', '.join(map(str, nums))}?", str(max(nums))


def _shopping_sentence(rnd, test):
    items = rnd.sample(GROCERIES, rnd.randint(2, 4))
    return (f"Turn this shopping list into one sentence: {'; '.join(items)}.",
            f"We need to buy {', '.join(items[:-1])} and {items[-1]}.")


def _antonym(rnd, test):
    pairs = ANTONYMS[-TEST_ANTONYMS:] if test else ANTONYMS[:-TEST_ANTONYMS]
    word, opposite = rnd.choice(pairs)
    if rnd.random() < 0.5:
        word, opposite = opposite, word
    return f"Give the opposite of the word \"{word}\". Answer with one word.", opposite


def _initials(rnd, test):
    first, last = rnd.choice(FIRST), rnd.choice(LAST)
    return f"Write the initials of {first} {last}.", f"{first[0]}. {last[0]}."


MAKERS = dict(zip(TASKS, (_sort_words, _extract_email, _product_line, _past_tense, _largest_number,
                          _shopping_sentence, _antonym, _initials)))


def examples(seed: int, train_per_task: int = 40, test_per_task: int = 8) -> dict[str, list[dict]]:
    """{"train": rows, "test": rows}, rows {"id", "task", "instruction", "response"}; no
    instruction is in both splits (nor twice in one)."""
    rnd = random.Random(seed)
    seen: set[str] = set()
    splits: dict[str, list[dict]] = {"train": [], "test": []}
    for split, per_task in (("test", test_per_task), ("train", train_per_task)):  # test first: it claims its rows
        for task in TASKS:
            made = 0
            while made < per_task:
                instruction, response = MAKERS[task](rnd, split == "test")
                if instruction in seen:
                    continue
                seen.add(instruction)
                splits[split].append({"id": f"sft-{split}-{len(splits[split]):04d}", "task": task,
                                      "instruction": instruction, "response": response})
                made += 1
    for split in splits:  # a mixed order, so a slice of the file holds every family
        rnd.shuffle(splits[split])
        for i, row in enumerate(splits[split]):
            row["id"] = f"sft-{split}-{i:04d}"
    return splits

"""Extractive question answering over short company profiles, written for jaxaccel.

Each passage describes one fictional company from its facts (founding year and town, founder,
chief executive, staff, flagship product and its material, yearly revenue, a partner), each
fact in one of two or three hand-written phrasings, in a shuffled order after the opening
sentence. Each passage gets two questions about different facts; the answer is a span of the
passage (checked here). The test split's companies, people and towns never appear in training.

`python -m recipes.data.make_lm_data` rewrites the files; the output is a pure function of SEED.
"""

from __future__ import annotations

import random

PREFIXES = ["Brack", "Cull", "Dray", "Elm", "Fane", "Gorse", "Holt", "Ister", "Jarrow", "Kell", "Lorn", "Mere",
            "Nether", "Orrin", "Pell", "Quarry", "Rook", "Sedge", "Thorn", "Umber", "Vale", "Wend", "Yew", "Zenn"]
SUFFIXES = ["wick", "stone", "ford", "mere", "haven", "gate", "field", "more"]
KINDS = [("Works", "kitchen scales"), ("Labs", "soil sensors"), ("Textiles", "hiking socks"),
         ("Audio", "bookshelf speakers"), ("Cycles", "cargo bikes"), ("Optics", "trail binoculars"),
         ("Foods", "oat crackers"), ("Robotics", "window-cleaning robots"), ("Ceramics", "stoneware mugs"),
         ("Marine", "electric outboard motors"), ("Furniture", "folding desks"), ("Instruments", "digital pianos")]
FIRST = ["Alma", "Bastian", "Cleo", "Dagny", "Emeric", "Freya", "Gideon", "Hester", "Ivo", "Jolene", "Kasimir",
         "Liesel", "Magnus", "Nerys", "Otto", "Pilar", "Quentin", "Rosalind", "Sten", "Thea", "Ulric", "Vivienne",
         "Wendel", "Xenia", "Yusuf", "Zelda"]
LAST = ["Abernethy", "Birkeland", "Carrow", "Dunstan", "Ekwueme", "Falkner", "Grisham", "Haugland", "Inchcape",
        "Jessop", "Kirkby", "Lauritzen", "Moravec", "Nettleship", "Okonjo", "Pemberton", "Rasmussen", "Sallow",
        "Tindall", "Uddin", "Varga", "Whitlock"]
TOWNS = ["Hollowmere", "Carrickfell", "Eastwold", "Brindlecombe", "Saltery", "Ravensholm", "Quillby",
         "Amberfold", "Duneside", "Marrowby", "Penhallow", "Westerlyn", "Glenhaven", "Tollbridge",
         "Orchardine", "Fernmouth", "Kilnsey", "Larkhill", "Netherby", "Stavecross"]
MATERIALS = ["recycled aluminium", "beech wood", "merino wool", "bamboo fibre", "cast iron", "hemp canvas",
             "glass fibre", "reclaimed oak", "cork", "carbon steel"]
PARTNERS = ["a regional rail operator", "a chain of garden centres", "a university hospital", "two large retailers",
            "a national park service", "a ferry company", "a group of village schools", "an airline caterer"]
TEST_SHARE = 0.2  # the share of companies, people and towns kept for the test split

# one entry per fact: (question phrasings, passage phrasings); {name} is the company
FACTS = {
    "founded": (["When was {name} founded?", "In which year was {name} founded?"],
                ["{name} was founded in {founded}.", "The company dates back to {founded}.",
                 "It has been in business since {founded}."]),
    "town": (["Where is {name} based?", "In which town does {name} have its headquarters?"],
             ["Its headquarters are in {town}.", "The company is based in {town}.",
              "{name} runs its business from {town}."]),
    "founder": (["Who founded {name}?", "Who started {name}?"],
                ["It was started by {founder}.", "{founder} founded the company.",
                 "The founder, {founder}, still sits on the board."]),
    "ceo": (["Who is the chief executive of {name}?", "Who leads {name}?"],
            ["Today it is led by chief executive {ceo}.", "{ceo} has been chief executive since {ceo_year}.",
             "The current chief executive is {ceo}."]),
    "staff": (["How many people does {name} employ?", "How many employees does {name} have?"],
              ["{name} employs {staff} people.", "The company has {staff} employees.",
               "About {staff} people work there."]),
    "material": (["What are {name}'s {product} made of?", "Which material does {name} use for its {product}?"],
                 ["Its {product} are made of {material}.", "The {product} are built from {material}.",
                  "{name} makes its {product} from {material}."]),
    "revenue": (["What was {name}'s revenue last year?", "How much revenue did {name} report last year?"],
                ["Last year its revenue was {revenue}.", "{name} reported revenue of {revenue} last year."]),
    "partner": (["Who is {name}'s largest customer?", "Which customer buys the most from {name}?"],
                ["Its largest customer is {partner}.", "The company's biggest buyer is {partner}."]),
}


def _split(names: list[str], rnd: random.Random) -> tuple[list[str], list[str]]:
    names = names[:]
    rnd.shuffle(names)
    k = max(1, round(len(names) * TEST_SHARE))
    return names[k:], names[:k]


def _company(rnd, prefixes, towns, people) -> dict:
    kind, product = rnd.choice(KINDS)
    founded = rnd.randint(1952, 2016)
    return {"name": f"{rnd.choice(prefixes)}{rnd.choice(SUFFIXES)} {kind}", "product": product,
            "founded": str(founded), "town": rnd.choice(towns), "founder": rnd.choice(people),
            "ceo": rnd.choice(people), "ceo_year": str(rnd.randint(founded + 3, 2024)),
            "staff": f"{rnd.randint(12, 2400):,}", "material": rnd.choice(MATERIALS),
            "revenue": f"{rnd.randint(2, 480)}.{rnd.randint(0, 9)} million euros", "partner": rnd.choice(PARTNERS)}


def _passage(c: dict, rnd: random.Random) -> str:
    opening = rnd.choice(["{name} makes {product}.", "{name} is a maker of {product}.",
                          "{name} designs and sells {product}."]).format(**c)
    facts = list(FACTS)
    rnd.shuffle(facts)
    stated = facts[:rnd.randint(5, len(facts))]
    return " ".join([opening] + [rnd.choice(FACTS[f][1]).format(**c) for f in stated]), stated


def items(seed: int, train_passages: int = 150, test_passages: int = 30) -> dict[str, list[dict]]:
    """{"train": rows, "test": rows}, rows {"id", "passage", "question", "answer", "fact"}: two
    questions per passage, each answer a span of its passage."""
    rnd = random.Random(seed)
    pre_train, pre_test = _split(PREFIXES, rnd)
    town_train, town_test = _split(TOWNS, rnd)
    people = [f"{f} {l}" for f in FIRST for l in LAST]
    people_train, people_test = _split(people, rnd)
    splits: dict[str, list[dict]] = {}
    seen: set[str] = set()
    for split, n, prefixes, towns, who in (("train", train_passages, pre_train, town_train, people_train),
                                           ("test", test_passages, pre_test, town_test, people_test)):
        rows = []
        while len(rows) < 2 * n:
            c = _company(rnd, prefixes, towns, who)
            if c["name"] in seen or c["founder"] == c["ceo"]:
                continue
            seen.add(c["name"])
            passage, stated = _passage(c, rnd)
            for fact in rnd.sample(stated, 2):
                answer = c[fact]
                assert answer in passage, (answer, passage)
                rows.append({"id": f"qa-{split}-{len(rows):04d}", "passage": passage,
                             "question": rnd.choice(FACTS[fact][0]).format(**c), "answer": answer, "fact": fact})
        splits[split] = rows
    return splits


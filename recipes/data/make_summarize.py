"""Short news items and their one-sentence summaries, written for jaxaccel.

Each item is an announcement by a fictional organisation (a plant opening, a product launch,
an acquisition, a product recall, a partnership, a closure). Its passage states the key facts
in one of two hand-written phrasings, then adds background and a quote in shuffled order (the
details a summary leaves out); its summary states the key facts in one sentence. The test
split's organisations, people and towns never appear in training.

`python -m recipes.data.make_lm_data` rewrites the files; the output is a pure function of SEED.
"""

from __future__ import annotations

import random

ORGS = ["Calder Freight", "Mosswood Bakeries", "Pinecrest Solar", "Harrowgate Pharma", "Lindqvist Toys",
        "Stonebridge Water", "Ashcombe Printing", "Blue Heron Ferries", "Copperfield Brewing", "Dovetail Joinery",
        "Eastmarch Dairy", "Fallowfield Seeds", "Greenhithe Glass", "Highmoor Textiles", "Ironwood Tools",
        "Juniper Health", "Kestrel Drones", "Lowther Paper", "Millbrook Foods", "Northgate Cables",
        "Oakhurst Furniture", "Pebblebay Kayaks", "Quarrington Stone", "Redcliffe Batteries", "Silverbirch Tea",
        "Thornbury Cycles", "Underhill Farms", "Vantage Optics", "Wrenfield Audio", "Yarrow Cosmetics"]
TOWNS = ["Ashwell", "Brackenridge", "Coldharbour", "Dunmere", "Eldercombe", "Foxholm", "Greyfriars", "Hazelford",
         "Ivybridge", "Kingsmoor", "Longmarsh", "Merriton", "Northwick", "Oxley", "Rosebank", "Sandhurst",
         "Thistlewood", "Upton Vale", "Whitmoor", "Yelverton"]
PEOPLE = ["Agnes Whitford", "Bruno Castell", "Carla Mendes", "Dmitri Olsen", "Elif Demir", "Felix Hargreave",
          "Gwen Adeyemi", "Hugo Lindahl", "Ines Moreau", "Jakob Sauer", "Kaia Thorsen", "Leon Brandt",
          "Mira Kovac", "Nils Aalto", "Odile Fournier", "Pavel Horak", "Ruth Ellery", "Sami Haddad",
          "Tilde Ahlberg", "Viktor Rosen"]
PRODUCTS = ["a folding electric scooter", "a solar-powered lantern", "a low-sugar breakfast cereal",
            "a smart water meter", "a recyclable coffee capsule", "a children's tablet", "a heat pump for flats",
            "a plant-based yoghurt", "a noise-cancelling headset", "a lightweight tent"]
DEFECTS = ["a faulty battery", "a loose handle", "mislabelled allergens", "a cracked seal", "a wiring fault"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"]
MONTHS = ["March", "April", "June", "September", "October", "November"]
TEST_SHARE = 0.2

# per kind: key-fact phrasings for the passage, and the summary
KINDS = {
    "opening": (["{org} will open a new plant in {town}, creating {jobs} jobs by {year}.",
                 "A new {org} plant is to be built in {town}; it will employ {jobs} people by {year}."],
                "{org} is opening a plant in {town} that will create {jobs} jobs by {year}."),
    "launch": (["{org} has launched {product}, priced at {price} euros.",
                "{org} began selling {product} this week for {price} euros."],
               "{org} launched {product} for {price} euros."),
    "acquisition": (["{org} has agreed to buy {org2} for {amount} million euros.",
                     "{org2} is being acquired by {org} in a deal worth {amount} million euros."],
                    "{org} is buying {org2} for {amount} million euros."),
    "recall": (["{org} is recalling {units} units of {product} because of {defect}.",
                "Because of {defect}, {org} has asked customers to return {units} units of {product}."],
               "{org} is recalling {units} units of {product} over {defect}."),
    "partnership": (["{org} and {org2} will work together to cut delivery times in {town}.",
                     "A new partnership between {org} and {org2} aims to cut delivery times in {town}."],
                    "{org} and {org2} are partnering to cut delivery times in {town}."),
    "closure": (["{org} will close its site in {town} in {month}, affecting {jobs} workers.",
                 "The {town} site of {org} is to shut in {month}, and {jobs} workers are affected."],
                "{org} is closing its {town} site in {month}, affecting {jobs} workers."),
}
BACKGROUND = ["{org} was founded in {founded} and now employs {staff} people.",
              "The announcement came on {weekday} after a board meeting.",
              "Shares in the company were little changed after the news.",
              "Local officials in {town} welcomed the decision.",
              "The company said more details would follow in its next report.",
              "Analysts had expected a move of this kind for some months."]
QUOTES = ["\"This is an important step for us,\" said chief executive {person}.",
          "\"We have listened to our customers,\" {person}, the company's spokesperson, said.",
          "{person}, who leads the company, called the plan \"the right decision at the right time\"."]


def _split(names: list[str], rnd: random.Random) -> tuple[list[str], list[str]]:
    names = names[:]
    rnd.shuffle(names)
    k = max(2, round(len(names) * TEST_SHARE))
    return names[k:], names[:k]


def _facts(rnd, orgs, towns, people) -> dict:
    org, org2 = rnd.sample(orgs, 2)
    return {"org": org, "org2": org2, "town": rnd.choice(towns), "person": rnd.choice(people),
            "jobs": str(rnd.randrange(40, 900, 10)), "year": str(rnd.randint(2026, 2030)),
            "product": rnd.choice(PRODUCTS), "price": str(rnd.randrange(19, 600, 10)),
            "amount": str(rnd.randint(8, 420)), "units": f"{rnd.randrange(2000, 90000, 500):,}",
            "defect": rnd.choice(DEFECTS), "month": rnd.choice(MONTHS), "founded": str(rnd.randint(1921, 2012)),
            "staff": f"{rnd.randrange(80, 6000, 20):,}", "weekday": rnd.choice(WEEKDAYS)}


def items(seed: int, train_items: int = 180, test_items: int = 36) -> dict[str, list[dict]]:
    """{"train": rows, "test": rows}, rows {"id", "kind", "passage", "summary"}."""
    rnd = random.Random(seed)
    orgs_train, orgs_test = _split(ORGS, rnd)
    towns_train, towns_test = _split(TOWNS, rnd)
    people_train, people_test = _split(PEOPLE, rnd)
    splits: dict[str, list[dict]] = {}
    seen: set[str] = set()
    for split, n, orgs, towns, people in (("train", train_items, orgs_train, towns_train, people_train),
                                          ("test", test_items, orgs_test, towns_test, people_test)):
        rows = []
        kinds = list(KINDS)
        while len(rows) < n:
            kind = kinds[len(rows) % len(kinds)]  # every kind equally often
            f = _facts(rnd, orgs, towns, people)
            extra = rnd.sample(BACKGROUND, 2) + [rnd.choice(QUOTES)]
            rnd.shuffle(extra)
            passage = " ".join([rnd.choice(KINDS[kind][0])] + extra).format(**f)
            if passage in seen:
                continue
            seen.add(passage)
            rows.append({"id": f"sum-{split}-{len(rows):04d}", "kind": kind, "passage": passage,
                         "summary": KINDS[kind][1].format(**f)})
        splits[split] = rows
    return splits

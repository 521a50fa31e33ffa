"""Builds bench/data/corpus.txt, the fixed perplexity corpus of bench/quant_quality.py.

Provenance: every word is original to this project (written for jaxaccel, no outside source).
  handwritten.txt  prose written by hand: a story, essays, a recipe, a letter, a dialogue,
                   a chronicle, a weather summary, a guide, questions and answers
  below            programmatically assisted sections: a gazetteer of invented villages,
                   worked arithmetic problems, a maintenance log and a commented program,
                   each sentence drawn from hand-written alternatives with a fixed seed
The output is committed; rerunning this script reproduces it byte for byte.

  python bench/data/make_corpus.py
"""

from __future__ import annotations

import random
from pathlib import Path

HERE = Path(__file__).resolve().parent

SYLLABLES = ["ash", "bel", "cor", "dun", "el", "fen", "gar", "holm", "ing", "kel", "lin", "mor", "ness",
             "or", "pen", "quel", "ros", "sted", "thorn", "ul", "vard", "wick", "yar", "zen"]
TRADES = ["weaving", "cheese-making", "boat-building", "slate quarrying", "bee-keeping", "pottery",
          "rope-making", "apple growing", "sheep farming", "salt panning", "glass blowing", "tanning"]
FEATURES = ["a stone bridge with five arches", "a ruined watchtower on the hill above it",
            "a square with a lime tree said to be four hundred years old", "a narrow harbour cut into the cliff",
            "a church whose tower leans noticeably to the west", "a market hall built of red brick",
            "a mill pond where swans nest every spring", "a row of weavers' cottages with long upper windows",
            "a covered well in the middle of the main street", "an inn that claims to have sheltered a king"]
EVENTS = ["a fire destroyed most of the wooden houses", "the railway arrived and the population doubled",
          "the river changed its course after a great flood", "the mine closed and many families left",
          "a new road bypassed the village and the inns emptied", "a school was founded by a retired sea captain",
          "a storm wrecked the fishing fleet", "the estate was broken up and sold to the tenants"]
SEASONS = ["spring", "summer", "autumn", "winter"]
CUSTOMS = ["the villagers walk the parish boundary and beat the old marker stones with willow sticks",
           "a bonfire is lit on the green and everyone brings one piece of wood",
           "the children race boats made of bark down the mill stream",
           "the oldest resident is crowned with a wreath of ivy and given the first slice of bread",
           "a lantern procession winds from the church to the harbour wall",
           "the bakers compete to make the largest loaf, which is then shared out at noon"]


def name(rng) -> str:
    return "".join(rng.sample(SYLLABLES, rng.choice([2, 2, 3]))).capitalize()


def gazetteer(rng, n: int) -> str:
    out = ["A Gazetteer of Invented Villages", ""]
    for _ in range(n):
        v, river = name(rng), name(rng)
        pop, year, miles = rng.randint(120, 4800), rng.randint(1520, 1910), rng.randint(3, 40)
        trade, feature = rng.choice(TRADES), rng.choice(FEATURES)
        sents = [
            f"{v} lies on the {rng.choice(['north', 'south', 'east', 'west'])} bank of the river {river}, "
            f"about {miles} miles from the county town.",
            rng.choice([f"Its population at the last count was {pop:,}.",
                        f"Some {pop:,} people live there today, fewer than a century ago.",
                        f"The parish records {pop:,} inhabitants, most of them in the old centre."]),
            rng.choice([f"The village was known for {trade} long before it was known for anything else.",
                        f"For generations the main livelihood was {trade}, and a few families still practise it.",
                        f"Visitors come for the scenery, but the local economy grew up around {trade}."]),
            f"Its best-known landmark is {feature}.",
            rng.choice([f"In {year} {rng.choice(EVENTS)}, and the village took many years to recover.",
                        f"Local histories date its decline, or its revival, to {year}, when {rng.choice(EVENTS)}.",
                        f"The great change came in {year}: {rng.choice(EVENTS)}."]),
            rng.choice([f"Every {rng.choice(SEASONS)} {rng.choice(CUSTOMS)}.",
                        f"An old custom survives: each {rng.choice(SEASONS)}, {rng.choice(CUSTOMS)}."]),
        ]
        if rng.random() < 0.5:
            sents.append(rng.choice([f"The nearest station is at {name(rng)}, a short bus ride away.",
                                     "There is a small museum in the former schoolhouse, open at weekends.",
                                     f"A footpath follows the {river} upstream to the neighbouring village of {name(rng)}."]))
        out += [" ".join(sents), ""]
    return "\n".join(out)


def arithmetic(rng, n: int) -> str:
    out = ["Worked Problems", ""]
    for i in range(1, n + 1):
        kind = rng.randrange(4)
        if kind == 0:
            a, b, p = rng.randint(3, 40), rng.randint(2, 12), rng.randint(2, 9)
            out.append(f"Problem {i}. A shop sells notebooks at {p} dollars each. Anna buys {a} and Ben buys {b}. "
                       f"How much do they spend together? Solution: together they buy {a} + {b} = {a + b} notebooks, "
                       f"so they spend {a + b} x {p} = {(a + b) * p} dollars.")
        elif kind == 1:
            d, s = rng.randint(20, 300), rng.choice([4, 5, 6, 8, 10, 12, 15, 20])
            out.append(f"Problem {i}. A cyclist rides {d} kilometres at a steady {s} kilometres per hour. How long "
                       f"does the ride take? Solution: time is distance divided by speed, {d} / {s} = "
                       f"{d / s:.2f} hours, which is about {round(60 * d / s)} minutes.")
        elif kind == 2:
            w, h = rng.randint(2, 30), rng.randint(2, 30)
            out.append(f"Problem {i}. A garden is {w} metres long and {h} metres wide. What length of fence goes "
                       f"around it, and what is its area? Solution: the perimeter is 2 x ({w} + {h}) = "
                       f"{2 * (w + h)} metres and the area is {w} x {h} = {w * h} square metres.")
        else:
            price, pct = rng.randint(20, 500), rng.choice([5, 10, 15, 20, 25, 30, 40])
            out.append(f"Problem {i}. A coat costs {price} dollars and is reduced by {pct} percent in a sale. What "
                       f"is the sale price? Solution: the discount is {price} x {pct} / 100 = {price * pct / 100:.2f} "
                       f"dollars, so the coat now costs {price - price * pct / 100:.2f} dollars.")
        out.append("")
    return "\n".join(out)


def maintenance_log(rng, n: int) -> str:
    parts = ["pump", "conveyor belt", "boiler feed valve", "air compressor", "cooling fan", "hydraulic press",
             "drive chain", "pressure gauge", "filter housing", "motor bearing"]
    findings = ["found a slow leak at the inlet flange and replaced the gasket",
                "heard a grinding noise at start-up; the bearing was dry and has been greased",
                "measured vibration above the usual level; the mounting bolts were loose and have been tightened",
                "saw the reading drift by about five percent; recalibrated against the reference",
                "found the filter half blocked with fine dust; cleaned it and shortened the inspection interval",
                "noticed the belt tracking to one side; adjusted the tail pulley",
                "observed no faults; cleaned, inspected and returned to service"]
    out = ["Maintenance Log, Line Two", ""]
    for day in range(1, n + 1):
        who = rng.choice(["R. Okafor", "J. Lindqvist", "M. Ferreira", "S. Tanaka", "P. Novak"])
        out.append(f"Day {day}, {rng.randint(6, 21):02d}:{rng.choice(['00', '15', '30', '45'])}, {who}: "
                   f"{rng.choice(parts)}: {rng.choice(findings)}. Running hours {rng.randint(1000, 90000):,}.")
    return "\n".join(out + [""])


PROGRAM = '''A Commented Program

# Count how often each word appears in a text file and print the most common ones.
import collections
import re
import sys


def words(text):
    """Split text into lowercase words, ignoring punctuation and digits."""
    return re.findall(r"[a-z']+", text.lower())


def main(path, top=10):
    with open(path, encoding="utf-8") as f:
        counts = collections.Counter(words(f.read()))
    width = max((len(w) for w, _ in counts.most_common(top)), default=0)
    for word, n in counts.most_common(top):
        # Right-align the counts so the column is easy to scan.
        print(f"{word:<{width}}  {n:>6}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 10)

The program reads the whole file at once, which is fine for books but not for files larger than memory;
reading line by line and updating the counter as it goes would remove that limit.
'''


def build() -> str:
    rng = random.Random(20261130)
    sections = [(HERE / "handwritten.txt").read_text(encoding="utf-8").strip(), gazetteer(rng, 70),
                arithmetic(rng, 75), maintenance_log(rng, 60), PROGRAM]
    return "\n\n".join(s.strip() for s in sections) + "\n"


if __name__ == "__main__":
    (HERE / "corpus.txt").write_text(build(), encoding="utf-8")

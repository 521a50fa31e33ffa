"""Financial-news sentiment sentences (negative / neutral / positive), written for jaxaccel.

Every sentence is composed from hand-written parts: a sentence frame per class and slot fillers
(fictional companies, figures, periods, places, products). The test split is held out twice over:
its companies never appear in training, and a third of its sentences use frames training never
saw, so a model cannot pass by remembering a frame or a name.

`python -m recipes.data.make_data` rewrites the files; the output is a pure function of SEED.
"""

from __future__ import annotations

import random

# fictional companies: the last TEST_COMPANIES only ever appear in the test split
COMPANIES = [
    "Nordvik Shipping", "Halden Paper", "Arcturus Telecom", "Brightwater Utilities", "Keldan Steel",
    "Miravel Foods", "Solenne Pharma", "Torvald Mining", "Quayside Retail", "Fenwick Logistics",
    "Oskarsby Bank", "Lumetra Software", "Vellamo Marine", "Greystone Cement", "Aurelia Cosmetics",
    "Pellinen Engineering", "Kestrel Airlines", "Rowan Hotels", "Silverfern Insurance", "Tamsin Textiles",
    "Ostrander Chemicals", "Birchmoor Construction", "Cardell Media", "Elkhorn Energy", "Hollis Instruments",
    "Juniper Grid", "Marrow & Finch", "Norrland Timber", "Pavia Motors", "Redwick Brewing",
    "Saltmarsh Foods", "Tidewater Ports", "Ulverston Plastics", "Wexley Pharmaceuticals",
    # test only
    "Amberlane Electronics", "Corvina Seafood", "Dunmore Packaging", "Frostvale Dairy",
    "Ingleby Robotics", "Larchfield Homes", "Merriweather Foods", "Stellan Medical",
]
TEST_COMPANIES = 8

METRICS = ["net sales", "operating profit", "net profit", "revenue", "order intake", "earnings per share",
           "comparable sales", "pre-tax profit", "cash flow from operations", "adjusted operating profit"]
PERIODS = ["in the third quarter", "for the first half of the year", "in the January-March period",
           "for the full year", "in the second quarter", "over the nine months to September",
           "in the fourth quarter", "in the April-June period", "last year", "in the first quarter"]
NEXT_PERIODS = ["the first-quarter", "the second-quarter", "the third-quarter", "the full-year", "the half-year"]
REPORTS = ["the first quarter", "January-June", "the third quarter", "the financial year", "January-September"]
CITIES = ["Tampere", "Gothenburg", "Rotterdam", "Leipzig", "Gdansk", "Aarhus", "Lyon", "Turin", "Bilbao",
          "Tallinn", "Oulu", "Bergen", "Antwerp", "Porto", "Brno", "Kaunas"]
REGIONS = ["the Nordic countries", "Central Europe", "North America", "the Baltic states", "Asia",
           "Southern Europe", "the United Kingdom", "Latin America"]
PRODUCTS = ["packaging board", "mobile network equipment", "frozen foods", "industrial pumps", "wind turbine parts",
            "specialty chemicals", "software licences", "steel pipes", "consumer electronics", "medical devices",
            "building materials", "paper machines", "container cranes", "dairy products", "marine engines",
            "electric buses", "insurance products", "office furniture"]
PARTNERS = ["a Finnish utility", "a German carmaker", "the Dutch railways", "a US retailer", "a Swedish port operator",
            "a large Chinese shipyard", "the Polish defence ministry", "an Indian telecom operator",
            "a French hospital group", "a Norwegian oil company", "the city of Helsinki", "a Japanese trading house"]
PEOPLE = ["Anna Lindqvist", "Mikko Rautio", "Sara Okafor", "Jonas Berg", "Eveliina Koski", "Tomas Novak",
          "Helena Duarte", "Pieter de Vries", "Laura Steiner", "Ravi Menon", "Ingrid Holm", "Marco Bellini"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
EXCHANGES = ["Helsinki stock exchange", "Nasdaq Stockholm", "Oslo Bors", "Euronext Amsterdam", "Warsaw Stock Exchange"]
CURRENCIES = ["EUR", "USD", "SEK", "NOK", "DKK"]

# frames per class; the last HELD_OUT_FRAMES of each list appear in the test split only
POSITIVE = [
    "{co}'s {metric} rose {pct} to {amt} {period}.",
    "{co} said its {metric} climbed to {amt} {period}, up from {amt2} a year earlier.",
    "{co} raised its full-year outlook after {metric} beat analysts' expectations.",
    "Shares in {co} jumped {pct} after the company won a {amt} contract from {partner}.",
    "{co} has signed a multi-year supply agreement with {partner} worth about {amt}.",
    "{co} reported record {metric} {period} on strong demand for its {product}.",
    "The board of {co} proposed a higher dividend as {metric} improved {period}.",
    "{co} swung to an operating profit of {amt} {period} from a loss a year earlier.",
    "Analysts upgraded {co} to buy, citing rising margins in its {product} business.",
    "{co}'s order backlog grew {pct} {period}, giving the company visibility well into next year.",
    "{co} expects {metric} to increase markedly this year thanks to new capacity in {city}.",
    "{co} will hire {n} people in {city} as demand for its {product} keeps growing.",
    "Net profit at {co} more than doubled to {amt} {period}.",
    "Strong cost control lifted {co}'s operating margin to {share} {period}.",
    "{co} beat market forecasts with {metric} of {amt} {period}.",
    "{co} said it has cut its net debt by {amt} and now expects to reach its margin target a year early.",
    # held out
    "Sales of {co}'s {product} increased {pct} in {region}, the company said on {day}.",
    "{co} completed the sale of its {product} unit above book value, booking a gain of {amt}.",
    "Investors cheered as {co} lifted its dividend for the fifth year in a row.",
    "{co}'s shares hit an all-time high after it reported {metric} well ahead of forecasts.",
]
NEGATIVE = [
    "{co}'s {metric} fell {pct} to {amt} {period}.",
    "{co} swung to an operating loss of {amt} {period}, compared with a profit of {amt2} a year earlier.",
    "{co} lowered its full-year guidance, citing weak demand for its {product}.",
    "Shares in {co} slumped {pct} after the company issued a profit warning.",
    "{co} will cut about {n} jobs in {city} as orders for its {product} dry up.",
    "{co}'s {metric} declined {period} as raw material costs rose.",
    "{partner} cancelled a {amt} order with {co}, the company said on {day}.",
    "{co} warned that its {metric} will be clearly below last year's level.",
    "Analysts downgraded {co} to sell after its margins narrowed for a third straight quarter.",
    "{co} booked an impairment charge of {amt} on its {product} business {period}.",
    "{co} suspended its dividend as its net loss widened to {amt} {period}.",
    "Comparable sales at {co} dropped {pct} {period}, hurt by weak consumer spending in {region}.",
    "{co} said it will close its plant in {city}, citing overcapacity and falling prices.",
    "{co} missed market forecasts with {metric} of {amt} {period}.",
    "{co}'s order intake shrank {pct} {period}, and the company sees no recovery before next year.",
    "{co}'s operating margin narrowed to {share} {period} from {share2} a year earlier.",
    # held out
    "A strike at {co}'s {city} mill cut production and will weigh on {next} results.",
    "Rating agencies put {co} on review for a downgrade after its debt rose to {amt}.",
    "{co}'s shares sank to a five-year low after it reported a loss of {amt} {period}.",
    "Weak prices for {product} pushed {co} deeper into the red {period}.",
]
NEUTRAL = [
    "{co} will publish its interim report for {report} on {date}.",
    "{co}'s annual general meeting will be held in {city} on {date}.",
    "{co} has appointed {person} as its chief financial officer, effective {date}.",
    "{co} makes {product} and employs about {n} people in {k} countries.",
    "{co} said it has moved its head office from {city} to {city2}.",
    "{co} and {partner} are to set up a joint venture for {product}; financial terms were not disclosed.",
    "{co} will hold a conference call for analysts and investors at {hour}:00 local time on {date}.",
    "{co} has a total of {shares} shares, of which {small} are held by the company itself.",
    "{co}'s shares are listed on the {exchange}.",
    "{person} will continue as chair of the board of {co}.",
    "{co} operates production sites in {city} and {city2}.",
    "{co} said its guidance for the year is unchanged.",
    "{co} has changed its reporting segments, and the comparison figures have been restated.",
    "The board of {co} will propose that {person} be elected as a new member at the annual general meeting.",
    "{co} is a supplier of {product} to customers in {region}.",
    "The contract covers the delivery of {product} to {partner} over the next two years, {co} said.",
    "{co} has published the notice of its annual general meeting, to be held on {date}.",
    "{co} sells its {product} mainly in {region}.",
    # held out
    "The deal between {co} and {partner} is expected to close in {report2}, subject to regulatory approval.",
    "{co} will report its results for {report} before the market opens on {date}.",
    "{co}'s {metric} came to {amt} {period}, in line with the same period a year earlier.",
    "{person}, who has led {co}'s {product} business since {year}, will retire at the end of the year.",
]
HELD_OUT_FRAMES = {"positive": 4, "negative": 4, "neutral": 4}
FRAMES = {"negative": NEGATIVE, "neutral": NEUTRAL, "positive": POSITIVE}
OPENERS = ["", "", "", "", "According to the company, ", "In a stock exchange release, "]

# sentences per split and class: neutral is the most common class, as in real news wires
COUNTS = {"train": {"negative": 150, "neutral": 270, "positive": 180},
          "test": {"negative": 40, "neutral": 70, "positive": 50}}


def _amount(rnd: random.Random) -> str:
    cur = rnd.choice(CURRENCIES)
    if rnd.random() < 0.2:
        return f"{cur} {rnd.randint(1, 9)}.{rnd.randint(0, 9)} billion"
    return f"{cur} {rnd.randint(2, 950)}.{rnd.randint(0, 9)} million"


def _fill(frame: str, rnd: random.Random, companies: list[str]) -> str:
    city, city2 = rnd.sample(CITIES, 2)
    share, share2 = sorted(rnd.sample(range(20, 180), 2))
    slots = dict(
        co=rnd.choice(companies), metric=rnd.choice(METRICS), period=rnd.choice(PERIODS), next=rnd.choice(NEXT_PERIODS),
        pct=f"{rnd.randint(1, 45)}.{rnd.randint(0, 9)} %", amt=_amount(rnd), amt2=_amount(rnd), city=city, city2=city2,
        region=rnd.choice(REGIONS), product=rnd.choice(PRODUCTS), partner=rnd.choice(PARTNERS),
        person=rnd.choice(PEOPLE), day=rnd.choice(DAYS), date=f"{rnd.randint(1, 28)} {rnd.choice(MONTHS)}",
        exchange=rnd.choice(EXCHANGES), report=rnd.choice(REPORTS), report2=rnd.choice(["the spring", "the autumn",
                                                                                          "the second half", "early next year"]),
        n=f"{rnd.randint(2, 60) * 10:,}" if rnd.random() < 0.6 else f"{rnd.randint(1, 12)},{rnd.randint(1, 9)}00",
        k=rnd.randint(3, 30), hour=rnd.randint(9, 16), shares=f"{rnd.randint(20, 400)},{rnd.randint(100, 999)},000",
        small=f"{rnd.randint(1, 4)}.{rnd.randint(0, 9)} %", year=rnd.randint(2009, 2022),
        share=f"{share / 10:.1f} %", share2=f"{share2 / 10:.1f} %")  # share < share2: "narrowed to X from Y"
    text = frame.format(**slots).replace("s's ", "s' ")  # "Larchfield Homes' shares"
    if frame.startswith("{co}") and " said" not in frame:  # an opener only where it reads naturally
        text = rnd.choice(OPENERS) + text
    return text


def sentences(seed: int) -> dict[str, list[dict]]:
    """{"train": rows, "test": rows}: rows {"id", "text", "label", "frame_in_train"} (False: a
    test sentence from a frame training never saw), no text in both splits."""
    rnd = random.Random(seed)
    train_cos, test_cos = COMPANIES[:-TEST_COMPANIES], COMPANIES[-TEST_COMPANIES:]
    seen: set[str] = set()
    out: dict[str, list[dict]] = {"train": [], "test": []}
    for split in ("train", "test"):
        for label, frames in FRAMES.items():
            held = HELD_OUT_FRAMES[label]
            companies = train_cos if split == "train" else test_cos
            made = 0
            while made < COUNTS[split][label]:
                # test: a third of the sentences from frames training never saw
                unseen = split == "test" and made % 3 == 0
                frame = rnd.choice(frames[-held:] if unseen else frames[:-held])
                text = _fill(frame, rnd, companies)
                if text in seen:
                    continue
                seen.add(text)
                out[split].append({"text": text, "label": label, "frame_in_train": not unseen})
                made += 1
        rnd.shuffle(out[split])
        for i, row in enumerate(out[split]):
            out[split][i] = {"id": f"{split}-{i:04d}", **row}
    return out

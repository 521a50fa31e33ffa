"""A shop catalog and its users, written for jaxaccel (the recommendation recipe's data).

Items: a fictional brand + a product from one of twelve departments, with a description
composed from the department's hand-written parts (a feature of the product, a use). Users:
each has two or three favourite departments and a favourite use in each; an interaction is an
item from one of them (more popular items, and items made for the favourite use, more often)
or, one time in six, a best-seller from anywhere. The last interactions of each user are held out.
"""

from __future__ import annotations

import random

BRANDS = ["Alder & Pike", "Bramblewood", "Copperline", "Driftmark", "Evenfall", "Foxglove", "Granite Peak",
          "Harbourlight", "Ironbark", "Juniper Lane", "Kittiwake", "Longstride", "Moss & Mortar", "Northhold",
          "Oakhurst", "Pebblebrook", "Quillon", "Ravenstone", "Saltwind", "Thistledown"]

# department: (products as "product: feature; feature", uses)
DEPARTMENTS = {
    "hiking": ([
        "trail backpack: with a ventilated back panel; with a built-in rain cover",
        "pair of trekking poles: with cork grips; that fold into three sections",
        "pair of waterproof hiking boots: with a grippy lugged sole; with a breathable membrane",
        "merino base layer: that stays fresh for days; with flat-locked seams",
        "rain shell jacket: with taped seams and a storm hood; that packs into its own pocket",
        "daypack: with a hip belt and side pockets; made from recycled nylon",
        "head torch: with a red night mode; with a rechargeable battery",
        "pair of softshell trousers: with a stretchy weave; that dry quickly after a downpour",
        "pair of gaiters: that keep mud and snow out of your boots; with a tough instep strap",
        "hydration bladder: with a bite valve; that holds two litres"],
        ["for long days on mountain trails", "for weekend treks in changeable weather",
         "for walks between mountain huts", "for forest paths and muddy moorland", "for early starts before sunrise"]),
    "coffee": ([
        "burr grinder: with fifty grind settings; with conical steel burrs",
        "pour-over dripper: with a ceramic cone; that brews one cup at a time",
        "espresso machine: with precise temperature control; with a steam wand",
        "gooseneck kettle: with a thin spout for a steady pour; that holds any temperature you set",
        "bag of single-origin beans: roasted light for fruity notes; from a small farm in Ethiopia",
        "cold brew jar: with a fine mesh filter; that fits in the fridge door",
        "coffee scale: with a built-in timer; accurate to a tenth of a gram",
        "moka pot: with an aluminium body; that works on gas and induction",
        "french press: with double-walled glass; with a four-level filter",
        "milk frother: that heats and foams in one go; with a whisk for latte art"],
        ["for a bright morning cup", "for home baristas chasing the perfect shot", "for slow weekend brewing",
         "for smooth iced coffee in summer", "for a strong cup before work"]),
    "gardening": ([
        "pair of pruning shears: with a rust-proof blade; with a safety lock",
        "raised bed kit: made from untreated larch; that assembles without tools",
        "watering can: with a long brass rose; that holds ten litres",
        "packet of heirloom tomato seeds: of a sweet cherry variety; saved from open-pollinated plants",
        "compost bin: with a lid that keeps rats out; with a hatch at the bottom",
        "garden kneeler: with a padded foam seat; that flips into a low bench",
        "hand trowel: with an ash wood handle; with a depth scale on the blade",
        "set of terracotta pots: with drainage holes; in three sizes",
        "soaker hose: that waters the roots slowly; that you bury under mulch",
        "pair of gardening gloves: with reinforced fingertips; that keep thorns out"],
        ["for tending vegetable beds", "for balcony herb gardens", "for growing seedlings in spring",
         "for keeping roses in shape", "for turning kitchen scraps into compost"]),
    "cycling": ([
        "road bike helmet: with MIPS protection; with a magnetic buckle",
        "pair of clipless pedals: with adjustable release tension; with a wide platform",
        "bike repair kit: with tyre levers and patches; with a multi-tool",
        "set of LED bike lights: with USB rechargeable batteries; that clip onto the handlebar",
        "cycling jersey: with a breathable mesh back; with three rear pockets",
        "pair of padded shorts: with a chamois pad; with silicone leg grippers",
        "frame bag: that fits inside the main triangle; with a waterproof zip",
        "mini pump: with a pressure gauge; that mounts next to the bottle cage",
        "bike computer: with GPS navigation; that shows heart rate and power",
        "set of mudguards: that keep the spray off your back; that fit wide tyres"],
        ["for fast road rides", "for commuting through the city in the dark", "for long gravel adventures",
         "for training sessions with intervals", "for rainy winter miles"]),
    "board games": ([
        "strategy board game: with a modular board; for two to four players",
        "cooperative card game: in which everyone wins or loses together; with beautifully illustrated cards",
        "deck-building game: with rounds that last about thirty minutes; with five expansion decks",
        "party word game: for up to ten players; with simple rules and lots of laughs",
        "two-player abstract game: with sturdy wooden pieces; with simple rules and deep choices",
        "dice-rolling game: with a solo mode; with custom engraved dice",
        "trading game set in a medieval port: with a storage insert; for three to five players",
        "deduction game: where one player is secretly the spy; with a sand timer",
        "campaign game with a story book: that changes as you play; with over fifty scenarios",
        "set of metal dice: with a velvet pouch; in polished brass"],
        ["for family game nights", "for friends who love clever puzzles", "for quick games over lunch",
         "for long evenings of planning and bluffing", "for gaming groups who meet every week"]),
    "photography": ([
        "mirrorless camera body: with in-body stabilisation; with weather sealing",
        "prime lens: with a fast f/1.8 aperture; with a quiet focus motor",
        "carbon fibre tripod: that weighs under a kilogram; with a quick-release plate",
        "camera sling bag: with a padded divider; with side access to the camera",
        "set of ND filters: in three strengths; with a magnetic holder",
        "memory card: with a high write speed; that survives water and shocks",
        "speedlight flash: with a wireless trigger; with a tilting head",
        "film camera: with a manual light meter; that takes standard 35 mm film",
        "photo printer: that prints on fine art paper; with eight pigment inks",
        "lens cleaning kit: with a blower and a soft brush; with microfibre cloths"],
        ["for sharp portraits with soft backgrounds", "for long exposures of waterfalls",
         "for street photography on the move", "for landscape trips at golden hour", "for shooting sports and wildlife"]),
    "baking": ([
        "stand mixer: with a planetary mixing action; with a dough hook",
        "sourdough proofing basket: made from natural rattan; with a linen liner",
        "cast iron loaf tin: that holds heat evenly; with a lid for a steamy crust",
        "digital kitchen scale: accurate to a single gram; with a tare button",
        "set of silicone spatulas: that are dishwasher safe; that stand heat up to 250 degrees",
        "bag of strong bread flour: milled from organic wheat; high in protein",
        "springform cake tin: with a leak-proof base; with a non-stick coating",
        "set of piping nozzles: with a reusable piping bag; in twenty shapes",
        "baking stone: that draws moisture from the dough; that takes the heat of a hot oven",
        "rolling pin: turned from beech wood; with thickness rings"],
        ["for crusty sourdough loaves", "for birthday cakes and layer sponges", "for crisp pizza bases at home",
         "for weekend cinnamon buns", "for decorating cupcakes"]),
    "home audio": ([
        "pair of bookshelf speakers: with a walnut veneer cabinet; with a soft dome tweeter",
        "turntable: with a belt-driven platter; with a built-in phono stage",
        "stereo amplifier: with a remote control; with a headphone output",
        "pair of over-ear headphones: with active noise cancelling; with a thirty-hour battery",
        "soundbar: with room correction; with a wireless subwoofer",
        "pair of wireless earbuds: with a charging case; that stay put when you run",
        "subwoofer: with deep controlled bass; with a front-firing driver",
        "portable bluetooth speaker: that floats in water; with a twelve-hour battery",
        "streaming receiver: that supports lossless streaming; with a digital output",
        "phono preamp: with a low-noise design; for moving magnet cartridges"],
        ["for listening to records at home", "for film nights with rich sound", "for focused work in a noisy office",
         "for parties in the garden", "for late-night listening"]),
    "yoga": ([
        "yoga mat: with a non-slip natural rubber surface; that rolls up small",
        "pair of cork yoga blocks: made from sustainable cork; with rounded edges",
        "meditation cushion: filled with buckwheat hulls; with a washable cover",
        "yoga strap: with a metal buckle; two and a half metres long",
        "bolster: with a firm cotton filling; with a carrying handle",
        "pair of leggings: with a high-waisted fit; with a hidden pocket",
        "foam roller: with a textured surface; that is firm but not hard",
        "set of resistance bands: in three strength levels; made of natural latex",
        "eye pillow: filled with flax seeds and lavender; with a silk cover",
        "wool blanket: woven in a mill in Wales; that folds into a firm support"],
        ["for daily stretching at home", "for restorative evening practice", "for calm morning meditation",
         "for recovery after running", "for hot yoga classes"]),
    "camping": ([
        "two-person tent: with a freestanding frame; with storm guy lines",
        "sleeping bag: rated to minus five degrees; that packs into a stuff sack",
        "inflatable sleeping pad: with an insulating layer; that inflates in ten breaths",
        "camping stove: with a piezo igniter; that boils water in three minutes",
        "set of titanium pots: that nest inside each other; with folding handles",
        "camp lantern: with a dimmable warm light; that charges a phone",
        "folding camp chair: with a cup holder; that packs into a small bag",
        "water filter: that removes bacteria and protozoa; that screws onto a bottle",
        "insulated mug: with a double-walled lid; that keeps tea hot for hours",
        "hammock: with tree-friendly straps; with a bug net"],
        ["for nights under the stars", "for family campsite holidays", "for canoe trips on quiet lakes",
         "for wild camping in the hills", "for festivals in summer"]),
    "woodworking": ([
        "set of bench chisels: with hardened steel edges; with hornbeam handles",
        "japanese pull saw: with a fine kerf; with a replaceable blade",
        "block plane: with an adjustable mouth; with a cast iron body",
        "marking gauge: with a brass fence; with a cutting wheel",
        "set of clamps: with quick-release jaws; in four lengths",
        "sharpening stone: in one thousand and six thousand grit; with a non-slip base",
        "combination square: machined to be dead square; with an etched scale",
        "bottle of danish oil: that brings out the grain; that dries to a satin finish",
        "mallet: made from beech; with a weighted head",
        "cordless drill: with two batteries; with a keyless chuck"],
        ["for cutting clean joints", "for building a first workbench", "for fine furniture making",
         "for finishing oak and walnut", "for weekend shed projects"]),
    "aquarium": ([
        "planted aquarium tank: with low-iron glass; with a cabinet",
        "canister filter: with a silent pump; with three media baskets",
        "aquarium heater: with an automatic thermostat; with a shatterproof shell",
        "LED aquarium light: with a sunrise and sunset cycle; that grows red plants",
        "bag of aquasoil: rich in nutrients for roots; that softens the water",
        "CO2 diffuser: with a ceramic disc; with a bubble counter",
        "water test kit: that checks ammonia and nitrite; with forty tests",
        "gravel vacuum: with a hand pump; that cleans the bed without lifting fish",
        "piece of driftwood: cleaned and ready to soak; that releases tannins",
        "fish food sampler: with flakes, pellets and frozen treats; for tropical fish"],
        ["for a lush nature aquascape", "for tropical community fish", "for shrimp and snail tanks",
         "for keeping water clear and healthy", "for beginners setting up a first tank"]),
}
FRAMES = [
    "{title}: {a_product} {feature}, made {use}.",
    "The {brand} {product}, {feature}. Made {use}.",
    "{A_product} {feature}, designed {use}.",
    "Our {product} {feature} is a favourite {use}.",
    "From {brand}: {a_product} {feature}. Ideal {use}.",
]

N_USERS = 120
HELD_OUT = 3  # interactions per user kept for evaluation
HISTORY = (6, 14)  # interactions per user used as the history (uniform in the range)
PREFERENCE = 4  # how much more often a user picks an item made for their favourite use


def _article(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" or noun.startswith("LED") else "a ") + noun


def catalog(seed: int) -> list[dict]:
    """Items {"id", "title", "department", "description"}: every (brand, product) pair and every
    description at most once."""
    rnd = random.Random(seed)
    items, written = [], set()
    for dept, (products, uses) in DEPARTMENTS.items():
        pairs = [(b, p) for b in BRANDS for p in products]
        rnd.shuffle(pairs)
        for brand, entry in pairs[:26]:
            product, features = entry.split(": ")
            title = f"{brand} {product.removeprefix('pair of ').removeprefix('set of ')}"
            a_product = _article(product)
            text = None
            while text is None or text in written:  # frames without the brand could repeat a description
                feature, use = rnd.choice(features.split("; ")), rnd.choice(uses)
                text = rnd.choice(FRAMES).format(title=title, brand=brand, product=product, feature=feature, use=use,
                                                 a_product=a_product, A_product=a_product[0].upper() + a_product[1:])
            written.add(text)
            items.append({"title": title, "department": dept, "description": text})
    rnd.shuffle(items)
    return [{"id": f"item-{i:03d}", **it} for i, it in enumerate(items)]


def users(items: list[dict], seed: int) -> list[dict]:
    """Users {"id", "departments", "history", "heldout"}: item ids in interaction order; the
    held-out ones are the user's last HELD_OUT and never in the history. In each favourite
    department a user has a favourite use (say, canoe trips); items made for it are picked
    PREFERENCE times as often, so what a user has bought says something about what comes next."""
    rnd = random.Random(seed + 1)
    popularity = {it["id"]: 1.0 / (rnd.randint(1, 40) ** 0.7) for it in items}  # a long tail
    by_dept: dict[str, list[dict]] = {}
    for it in items:
        by_dept.setdefault(it["department"], []).append(it)
    best_sellers = sorted(popularity, key=popularity.get, reverse=True)[:30]
    out = []
    for u in range(N_USERS):
        likes = rnd.sample(sorted(by_dept), rnd.choice((2, 2, 3)))
        favourite = {d: rnd.choice(DEPARTMENTS[d][1]) for d in likes}
        n = rnd.randint(*HISTORY) + HELD_OUT
        seq: list[str] = []
        while len(seq) < n:
            if rnd.random() < 1 / 6:
                pick = rnd.choices(best_sellers, weights=[popularity[i] for i in best_sellers])[0]
            else:
                dept = rnd.choice(likes)
                pool = by_dept[dept]
                weights = [popularity[it["id"]] * (PREFERENCE if favourite[dept] in it["description"] else 1)
                           for it in pool]
                pick = rnd.choices(pool, weights=weights)[0]["id"]
            if pick not in seq:
                seq.append(pick)
        out.append({"id": f"user-{u:03d}", "departments": likes, "history": seq[:-HELD_OUT],
                    "heldout": seq[-HELD_OUT:]})
    return out

"""Writes `blair_pairs.tsv`: synthetic BLaIR (review, meta) pairs for `:smoke` runs and tests.

    python -m mmret_jax.data.samples.make_blair_sample [--output PATH] [--seed 0]

A made-up catalog (brand, product type, colour, material, 2-3 features, one
description sentence; meta text built like the seed: title + features +
description) and review-like texts. Each review names 1-3 of its item's
attributes (brand, type, colour, material or a feature) among opinion filler,
off-topic remarks and a few typos, so a tiny RoBERTa trained from scratch can
learn to retrieve the item from the review within a few hundred steps. Rows are
shuffled so the first-1% validation split covers many items. Deterministic for
a given seed and Python version (`random`); the committed TSV is the reference.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import random

from mmret_jax.data.sources.amazon_reviews import format_tsv_row, meta_text, review_text

OUTPUT = pathlib.Path(__file__).with_name("blair_pairs.tsv")

# category -> (materials, {type: features})
CATALOG = {
    "Kitchen": (
        ["stainless steel", "ceramic", "bamboo", "cast iron", "borosilicate glass", "copper"],
        {"electric kettle": ["auto shut-off", "boil-dry protection", "1.7 liter capacity", "keep-warm mode",
                             "LED water window", "cordless 360 base"],
         "blender": ["six sharp blades", "pulse function", "1200 watt motor", "ice crushing mode",
                     "dishwasher safe jar", "three speed settings"],
         "frying pan": ["nonstick coating", "induction compatible", "oven safe to 500F", "cool touch handle",
                        "pour spouts", "glass lid included"],
         "chef knife": ["full tang blade", "ergonomic handle", "razor sharp edge", "blade guard included",
                        "hand forged", "rust resistant"],
         "coffee grinder": ["burr grinding", "18 grind settings", "removable hopper", "quiet motor",
                            "one touch start", "cleaning brush included"],
         "cutting board": ["juice groove", "non-slip feet", "reversible design", "knife friendly surface",
                           "easy grip handles"],
         "toaster": ["extra wide slots", "bagel setting", "defrost function", "removable crumb tray",
                     "seven browning levels"]}),
    "Electronics": (
        ["aluminum", "matte plastic", "silicone", "tempered glass", "carbon fiber"],
        {"wireless earbuds": ["active noise cancelling", "30 hour battery", "touch controls", "IPX7 waterproof",
                              "charging case", "low latency mode"],
         "bluetooth speaker": ["deep bass", "24 hour playtime", "stereo pairing", "built-in microphone",
                               "floating design", "USB-C charging"],
         "phone charger": ["65W fast charging", "dual USB-C ports", "foldable plug", "overheat protection",
                           "gallium nitride chip"],
         "usb hub": ["seven ports", "4K HDMI output", "SD card reader", "100W pass-through", "braided cable"],
         "smartwatch": ["heart rate monitor", "sleep tracking", "GPS built in", "always-on display",
                        "swim proof", "ten day battery"],
         "webcam": ["1080p video", "auto focus", "privacy shutter", "dual microphones", "wide angle lens"],
         "power bank": ["20000mAh capacity", "LED power display", "pass-through charging", "slim profile",
                        "airline approved"]}),
    "Sports_and_Outdoors": (
        ["ripstop nylon", "natural rubber", "aluminum alloy", "polyester", "neoprene", "TPE foam"],
        {"yoga mat": ["6mm thick cushioning", "non-slip texture", "alignment lines", "carrying strap",
                      "sweat resistant"],
         "hiking backpack": ["40 liter capacity", "rain cover", "hydration sleeve", "padded hip belt",
                             "ventilated back panel", "many pockets"],
         "camping tent": ["two person", "instant setup", "waterproof rainfly", "mesh windows",
                          "aluminum poles", "storage bag"],
         "dumbbell set": ["adjustable weight", "anti-roll design", "knurled grip", "storage tray",
                          "quick change dial"],
         "camping lantern": ["rechargeable battery", "three light modes", "hanging hook", "500 lumens",
                             "collapsible body"],
         "trekking poles": ["cork grips", "flip locks", "shock absorbing", "carbide tips", "adjustable length"],
         "cycling gloves": ["gel padding", "touchscreen fingertips", "breathable mesh", "pull-off tabs",
                            "reflective strips"]}),
    "Beauty": (
        ["glass bottle", "recyclable tube", "vegan formula", "airless pump", "travel size"],
        {"face serum": ["vitamin C", "hyaluronic acid", "fragrance free", "dropper bottle", "brightening",
                        "for sensitive skin"],
         "hair dryer": ["ionic technology", "diffuser attachment", "cool shot button", "three heat settings",
                        "lightweight design", "1875 watts"],
         "lipstick": ["long lasting", "matte finish", "moisturizing shea butter", "smudge proof",
                      "cruelty free"],
         "moisturizer": ["SPF 30", "oil free", "ceramides", "non-greasy", "night cream formula"],
         "shampoo": ["sulfate free", "argan oil", "color safe", "tea tree scent", "volumizing"],
         "makeup brush set": ["twelve brushes", "travel case", "soft dense bristles", "easy to clean",
                              "wooden handles"]}),
    "Pet_Supplies": (
        ["nylon webbing", "orthopedic foam", "stainless steel", "natural rubber", "plush fleece"],
        {"dog leash": ["six foot length", "padded handle", "reflective stitching", "swivel clip",
                       "poop bag holder"],
         "cat bed": ["washable cover", "raised rim", "self warming", "non-slip bottom", "donut shape"],
         "pet bowl": ["slow feeder", "non-skid base", "double bowl", "dishwasher safe", "spill proof"],
         "chew toy": ["squeaker inside", "treat dispenser", "tough chewer rated", "floats in water",
                      "minty dental ridges"],
         "dog harness": ["no pull front clip", "adjustable straps", "breathable padding", "handle on back",
                         "quick release buckles"],
         "litter box": ["high sides", "odor control filter", "sliding tray", "hooded top", "scoop included"]}),
    "Office_Products": (
        ["recycled paper", "oak wood", "steel frame", "mesh fabric", "acrylic"],
        {"desk lamp": ["dimmable LED", "USB charging port", "flexible gooseneck", "five color temperatures",
                       "auto off timer"],
         "notebook": ["dotted pages", "lay flat binding", "elastic closure", "numbered pages", "ribbon bookmark"],
         "gel pens": ["fine 0.5mm tips", "quick drying ink", "assorted colors", "comfort grip", "smear proof"],
         "office chair": ["lumbar support", "adjustable armrests", "tilt lock", "360 swivel", "headrest"],
         "stapler": ["jam free", "50 sheet capacity", "reload indicator", "rubber base", "spring powered"],
         "file organizer": ["six compartments", "label slots", "stackable", "magazine holder",
                            "fits letter size"]}),
}
COLOURS = ["red", "blue", "green", "black", "white", "grey", "pink", "purple", "orange", "yellow", "teal",
           "navy", "beige", "silver", "gold", "brown"]
_ONSETS = ["b", "br", "c", "d", "f", "g", "gr", "k", "kl", "l", "m", "n", "p", "pr", "r", "s", "st", "t",
           "tr", "v", "z", "zh", "qu", "x"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "eo", "y"]
_CODAS = ["", "n", "r", "x", "l", "s", "k", "m", "nt", "rd"]
DESCRIPTIONS = [
    "The {brand} {type} is made of {material} and built for everyday use.",
    "Designed by {brand}, this {colour} {type} combines {material} with a clean modern look.",
    "A reliable {type} from {brand} in {colour}, crafted from durable {material}.",
    "{brand} made this {type} to last, with a {material} body and a {colour} finish.",
    "Upgrade your routine with the {brand} {type}, now in {colour} {material}.",
]
REVIEW_TITLES = ["Great purchase", "Five Stars", "Works as described", "Not bad", "Love it", "Good value",
                 "Exactly what I needed", "Solid", "Pretty good", "Happy with it", "Does the job",
                 "Mixed feelings", "Better than expected", "Okay for the price", "Would recommend"]
MENTIONS = {
    "brand": ["{brand} really knows what they are doing.", "My second {brand} product and still happy.",
              "I trust {brand} for this kind of thing.", "Did not know {brand} before but now I am a fan.",
              "Quality is typical {brand}."],
    "type": ["This {type} does the job.", "Needed a new {type} and this one works.",
             "Best {type} I have owned so far.", "We use the {type} every day.",
             "Replaced my old {type} with this."],
    "colour": ["The {colour} color is exactly like the photos.", "Got it in {colour} and it looks nice.",
               "Love the {colour} shade.", "The {colour} matches the rest of my stuff."],
    "material": ["The {material} feels sturdy.", "You can tell the {material} is good quality.",
                 "Nice {material}, not cheap at all."],
    "feature": ["The {feature} is a nice touch.", "Bought it mainly for the {feature}.",
                "The {feature} works great.", "Really like the {feature}."],
}
MENTION_WEIGHTS = {"brand": 0.6, "type": 0.8, "colour": 0.5, "material": 0.3, "feature": 0.7}
OPINIONS = ["Would buy again.", "Five stars from me.", "Not perfect but good for the price.",
            "Exceeded my expectations.", "Does what it says.", "Pretty happy overall.",
            "Took a star off for the packaging.", "Highly recommend.", "Solid value for money.",
            "It is fine, nothing special.", "My family loves it.", "Works well so far."]
NOISE = ["Shipping took forever.", "Package arrived a day early.", "Box was a bit dented.",
         "Bought this as a gift.", "Customer service was helpful.", "Price went down after I bought it.",
         "Will update after a few months.", "Instructions could be clearer.", "lol", "Thanks!!"]


@dataclasses.dataclass(frozen=True)
class Item:
  category: str
  brand: str
  type: str
  colour: str
  material: str
  features: tuple[str, ...]
  meta: str


def _brand_names(rng: random.Random, n: int) -> list[str]:
  names: set[str] = set()
  while len(names) < n:
    syl = [rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(rng.choice((2, 2, 3)))]
    name = ("".join(syl) + rng.choice(_CODAS)).capitalize()
    if 5 <= len(name) <= 10:
      names.add(name)
  return sorted(names)


def make_catalog(rng: random.Random, n_items: int, brands_per_category: int = 10) -> list[Item]:
  """`n_items` distinct (brand, type, colour) items spread over CATALOG's categories."""
  brands = _brand_names(rng, brands_per_category * len(CATALOG))
  rng.shuffle(brands)
  cat_brands = {c: brands[k * brands_per_category:(k + 1) * brands_per_category]
                for k, c in enumerate(CATALOG)}
  items, seen = [], set()
  cats = list(CATALOG)
  while len(items) < n_items:
    cat = cats[len(items) % len(cats)]
    materials, types = CATALOG[cat]
    typ = rng.choice(sorted(types))
    key = (rng.choice(cat_brands[cat]), typ, rng.choice(COLOURS))
    if key in seen:
      continue
    seen.add(key)
    brand, _, colour = key
    material = rng.choice(materials)
    feats = tuple(rng.sample(types[typ], rng.choice((2, 3))))
    model = f"{brand[:2].upper()}-{rng.randrange(100, 1000)}"
    title = f"{brand} {_title(typ)} {model}, {_title(colour)} {_title(material)}"
    desc = rng.choice(DESCRIPTIONS).format(brand=brand, type=typ, colour=colour, material=material)
    meta = meta_text({"title": title, "features": [f[0].upper() + f[1:] for f in feats], "description": [desc]})
    items.append(Item(cat, brand, typ, colour, material, feats, meta))
  return items


def _title(s: str) -> str:
  return " ".join(w if w.isupper() else w.capitalize() for w in s.split())


def _typo(rng: random.Random, s: str, p: float) -> str:
  words = s.split(" ")
  for k, w in enumerate(words):
    if len(w) > 3 and rng.random() < p:
      j = rng.randrange(len(w) - 1)
      words[k] = w[:j] + w[j + 1] + w[j] + w[j + 2:]
  return " ".join(words)


def make_review(rng: random.Random, item: Item) -> str:
  """A review text naming 1-3 of the item's attributes, with filler and noise."""
  kinds = list(MENTION_WEIGHTS)
  k = rng.choice((1, 2, 2, 3))
  chosen: list[str] = []
  while len(chosen) < k:
    kind = rng.choices(kinds, weights=[MENTION_WEIGHTS[x] for x in kinds])[0]
    if kind not in chosen:
      chosen.append(kind)
  values = {"brand": item.brand, "type": item.type, "colour": item.colour, "material": item.material,
            "feature": rng.choice(item.features).lower()}
  sents = [rng.choice(MENTIONS[c]).format(**values) for c in chosen]
  sents.append(rng.choice(OPINIONS))
  if rng.random() < 0.4:
    sents.append(rng.choice(NOISE))
  rng.shuffle(sents)
  body = _typo(rng, " ".join(sents), p=0.03)
  if rng.random() < 0.15:
    body = body.lower()
  return review_text({"title": rng.choice(REVIEW_TITLES), "text": body})


def make_pairs(seed: int = 0, n_items: int = 500, n_pairs: int = 4000) -> list[tuple[str, str]]:
  """Shuffled (review, meta) pairs: every item gets >= 3 reviews, popular ones more."""
  rng = random.Random(seed)
  items = make_catalog(rng, n_items)
  weights = [rng.paretovariate(1.5) for _ in items]
  counts = [3] * n_items
  for k in rng.choices(range(n_items), weights=weights, k=n_pairs - 3 * n_items):
    counts[k] += 1
  pairs = [(make_review(rng, it), it.meta) for it, c in zip(items, counts) for _ in range(c)]
  rng.shuffle(pairs)
  return pairs


def main(argv=None) -> None:
  p = argparse.ArgumentParser(prog="python -m mmret_jax.data.samples.make_blair_sample")
  p.add_argument("--output", default=str(OUTPUT))
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--items", type=int, default=500)
  p.add_argument("--pairs", type=int, default=4000)
  args = p.parse_args(argv)
  pairs = make_pairs(args.seed, args.items, args.pairs)
  with open(args.output, "w", encoding="utf-8", newline="") as f:
    f.write(format_tsv_row("review", "meta"))
    for review, meta in pairs:
      f.write(format_tsv_row(review, meta))
  print(f"Wrote {len(pairs)} pairs ({len({m for _, m in pairs})} items) to {args.output}")


if __name__ == "__main__":
  main()

"""Everyday topics for the instruct task, each with a few words that belong to it.

``TOPICS`` maps a topic (a lowercase noun or gerund phrase that fits every request form of
:data:`REQUEST_FORMS`, e.g. ``"Give advice on saving money."``) to topic words: single lowercase
words that an answer about the topic would naturally use, none of them a word of the topic phrase
itself (so echoing the request never satisfies a keyword rule). Keyword rules draw their words
from here; forbidden-word rules draw from here and from :data:`COMMON_WORDS`.
"""

from __future__ import annotations

import re

TOPICS: dict[str, tuple[str, ...]] = {
    "growing tomatoes": ("soil", "sun", "water", "seeds", "garden"),
    "saving money": ("budget", "bank", "spending", "savings", "goals"),
    "learning a new language": ("words", "practice", "grammar", "speaking", "listening"),
    "walking a dog": ("leash", "park", "exercise", "treats", "fresh"),
    "making coffee": ("beans", "water", "grind", "cup", "brew"),
    "getting better sleep": ("bed", "night", "dark", "routine", "screens"),
    "baking bread": ("flour", "yeast", "dough", "oven", "salt"),
    "riding a bike": ("helmet", "wheels", "balance", "road", "pedal"),
    "keeping a houseplant alive": ("water", "light", "pot", "leaves", "soil"),
    "planning a birthday party": ("guests", "cake", "invitations", "music", "budget"),
    "cleaning the kitchen": ("sink", "soap", "counters", "sponge", "floor"),
    "studying for an exam": ("schedule", "practice", "breaks", "review", "focus"),
    "drinking enough water": ("bottle", "thirst", "health", "day", "glass"),
    "packing for a trip": ("suitcase", "clothes", "list", "passport", "shoes"),
    "starting to run": ("shoes", "pace", "breathing", "stretch", "distance"),
    "cooking rice": ("pot", "water", "heat", "grains", "lid"),
    "writing a thank-you letter": ("gratitude", "paper", "kind", "friend", "sign"),
    "taking care of a cat": ("food", "litter", "play", "vet", "fur"),
    "making new friends": ("clubs", "smile", "conversation", "interests", "trust"),
    "reading more books": ("library", "pages", "habit", "stories", "time"),
    "reducing stress": ("breathing", "calm", "walk", "rest", "music"),
    "brushing your teeth": ("toothbrush", "toothpaste", "gums", "minutes", "floss"),
    "visiting a museum": ("art", "tickets", "history", "exhibits", "guide"),
    "eating more vegetables": ("salad", "soup", "carrots", "fiber", "meals"),
    "recycling at home": ("bins", "plastic", "paper", "glass", "sorting"),
    "preparing for a job interview": ("resume", "questions", "confidence", "company",
                                      "practice"),
    "learning to swim": ("pool", "breath", "float", "kick", "lessons"),
    "keeping a journal": ("pen", "thoughts", "daily", "pages", "feelings"),
    "organizing a closet": ("shelves", "hangers", "clothes", "boxes", "space"),
    "taking better photos": ("light", "camera", "angle", "focus", "subject"),
    "planting a tree": ("shovel", "roots", "hole", "water", "shade"),
    "making a budget": ("income", "expenses", "spreadsheet", "goals", "bills"),
    "staying safe in hot weather": ("shade", "water", "sunscreen", "hat", "heat"),
    "staying warm in winter": ("coat", "layers", "scarf", "heating", "gloves"),
    "choosing a pet": ("space", "time", "cost", "family", "breed"),
    "learning to cook": ("recipes", "knife", "ingredients", "kitchen", "taste"),
    "using public transport": ("bus", "train", "ticket", "schedule", "map"),
    "writing a short story": ("character", "plot", "ending", "conflict", "setting"),
    "practicing the guitar": ("chords", "strings", "fingers", "rhythm", "tuning"),
    "going camping": ("tent", "fire", "backpack", "forest", "flashlight"),
    "washing clothes": ("detergent", "machine", "colors", "temperature", "dryer"),
    "making a sandwich": ("bread", "cheese", "butter", "lettuce", "knife"),
    "painting a room": ("brush", "paint", "walls", "color", "tape"),
    "learning to draw": ("pencil", "paper", "shapes", "shading", "practice"),
    "caring for your skin": ("sunscreen", "water", "soap", "moisturizer", "sleep"),
    "spending less time on your phone": ("apps", "notifications", "screen", "hours", "habits"),
    "having a picnic": ("blanket", "basket", "park", "food", "weather"),
    "growing herbs indoors": ("basil", "pots", "window", "light", "water"),
    "moving to a new city": ("neighbors", "rent", "boxes", "streets", "friends"),
    "fixing a flat tire": ("pump", "patch", "wheel", "air", "tube"),
    "watching the stars": ("sky", "night", "telescope", "moon", "planets"),
    "making a cup of tea": ("kettle", "leaves", "water", "milk", "steep"),
    "staying focused at work": ("tasks", "breaks", "desk", "goals", "distractions"),
    "hosting a dinner": ("guests", "table", "menu", "dessert", "candles"),
    "learning to type faster": ("keyboard", "fingers", "speed", "accuracy", "practice"),
    "taking a nap": ("minutes", "afternoon", "energy", "quiet", "alarm"),
    "keeping bees": ("hive", "honey", "flowers", "queen", "smoke"),
    "starting a garden": ("soil", "seeds", "sun", "water", "tools"),
    "being a good listener": ("attention", "questions", "eyes", "patience", "respect"),
    "making pancakes": ("flour", "eggs", "milk", "pan", "syrup"),
    "stretching in the morning": ("muscles", "arms", "legs", "breath", "body"),
    "visiting the dentist": ("teeth", "checkup", "cleaning", "appointment", "cavities"),
    "feeding birds": ("seeds", "feeder", "winter", "garden", "species"),
    "choosing running shoes": ("fit", "cushion", "size", "store", "feet"),
    "writing an email": ("subject", "greeting", "clear", "polite", "reply"),
}

# Words that most answers use: the other source of forbidden words.
COMMON_WORDS: tuple[str, ...] = (
    "very", "really", "just", "thing", "important", "good", "great", "also", "always",
    "many", "people", "easy", "best", "help", "make",
)

# Keyword pool for a topic not in TOPICS.
GENERIC_KEYWORDS: tuple[str, ...] = ("time", "simple", "start", "plan", "example")

# The request line: one of these with ``{topic}`` filled in.
REQUEST_FORMS: tuple[str, ...] = (
    "Write a short note about {topic}.",
    "Explain {topic} to a beginner.",
    "Give advice on {topic}.",
    "Describe the benefits of {topic}.",
    "Tell me about {topic}.",
    "Share a few tips on {topic}.",
    "Write a short paragraph about {topic}.",
    "What should I know about {topic}?",
    "Give a quick overview of {topic}.",
    "Explain why {topic} matters.",
)


def topic_words(topic: str) -> tuple[str, ...]:
    """The lowercase words of a topic phrase (split at anything not a letter):
    ``"writing a thank-you letter"`` → ``("writing", "a", "thank", "you", "letter")``."""
    return tuple(re.findall(r"[a-z]+", topic.lower()))


def topic_keywords(topic: str) -> tuple[str, ...]:
    """The topic words of ``topic`` from :data:`TOPICS`, or :data:`GENERIC_KEYWORDS` for a topic
    not listed there (less fitting, but any topic string works)."""
    return TOPICS.get(topic, GENERIC_KEYWORDS)

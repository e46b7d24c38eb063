#!/usr/bin/env python3
"""Generates data/sentences.txt: the sentence set for `undertone data synth`.

Written for the project: every template and word list below is our own. Each
output line is `KIND<TAB>SENTENCE`, where KIND is `neutral` (emotionally flat
content) or `loaded:CLASS` (content that by its words suggests CLASS, one of
happy, sad, angry). Sentences are distinct; the file is sorted by kind and then
shuffled within kind with a fixed seed, so re-running reproduces it byte for byte.

Usage: python3 data/make_sentences.py [--out data/sentences.txt]
"""
import argparse
import itertools
import random

SEED = 20240617
TARGETS = {"neutral": 3000, "loaded:happy": 1000, "loaded:sad": 1000, "loaded:angry": 1000}

PEOPLE = ["my brother", "my sister", "the manager", "our neighbour", "the teacher", "my friend Anna",
          "David", "the doctor", "my cousin", "the new intern", "your uncle", "the landlord",
          "Maria", "the driver", "my grandmother", "the coach", "Peter", "the accountant"]
OBJECTS = ["the blue folder", "the spare key", "the printer paper", "a box of tea", "the train tickets",
           "the garden hose", "the old laptop", "the kitchen scale", "a pair of gloves", "the map",
           "the umbrella", "the invoice", "the grocery list", "the charger", "a bag of flour",
           "the winter coat", "the toolbox", "the library book"]
PLACES = ["the kitchen", "the office", "the station", "the garage", "the library", "the market",
          "the second floor", "the car park", "the post office", "the back garden", "the hallway",
          "the corner shop", "the bus stop", "the reception desk", "the basement", "the town hall"]
DAYS = ["on Monday", "on Tuesday", "on Wednesday", "on Thursday", "on Friday", "on Saturday",
        "on Sunday", "next week", "tomorrow morning", "this afternoon", "at the end of the month",
        "before lunch", "after the meeting", "in the evening"]
TIMES = ["at seven", "at half past eight", "at nine fifteen", "at ten o'clock", "at noon",
         "at a quarter to three", "at four thirty", "at six", "at twenty past five"]
CITIES = ["Leeds", "Boston", "Lyon", "Denver", "Glasgow", "Porto", "Dublin", "Oslo", "Austin",
          "Bristol", "Utrecht", "Seattle"]
NUMBERS = ["two", "three", "four", "five", "six", "seven", "eight", "ten", "twelve", "fifteen", "twenty"]
UNITS = ["minutes", "days", "pages", "boxes", "chairs", "tickets", "kilometres", "people"]
TOPICS = ["the budget", "the schedule", "the new software", "the parking rules", "the heating",
          "the delivery", "the report", "the rota", "the contract", "the survey results"]
COLOURS = ["grey", "green", "white", "brown", "yellow", "dark blue", "red", "black"]
THINGS = ["door", "table", "lamp", "bicycle", "fence", "cupboard", "shelf", "window", "car", "bench"]

NEUTRAL = [
    "{P} left {O} in {L}.",
    "Please put {O} in {L} {D}.",
    "The train to {C} leaves {T}.",
    "The meeting about {X} starts {T} {D}.",
    "{P} will call you {D}.",
    "We need {N} more {U} for the project.",
    "The {K} {H} is next to {L}.",
    "I think {O} is still in {L}.",
    "The shop in {L} closes {T}.",
    "{P} asked about {X} {D}.",
    "The report on {X} is due {D}.",
    "It takes about {N} {U} to get to {C}.",
    "{P} moved to {C} last year.",
    "Could you check {X} {D}?",
    "The bus to {L} comes every {N} minutes.",
    "Remember to bring {O} {D}.",
    "The new {H} arrived {D}.",
    "There are {N} {U} in {L}.",
    "{P} painted the {H} {K}.",
    "The office in {C} opens {T}.",
    "I will send the notes on {X} {D}.",
    "{P} is looking for {O}.",
    "The forecast for {C} says light rain {D}.",
    "We counted {N} {U} this morning.",
    "Is {O} in {L} or in the car?",
    "The {H} in {L} is {K}.",
    "{P} usually takes the bus {T}.",
    "Let us discuss {X} {D}.",
    "The flight from {C} lands {T}.",
    "I put {O} on the {H}.",
]
HAPPY = [
    "I am so happy that {P} is coming {D}!",
    "We won! We actually won the prize!",
    "This is the best news I have heard all year!",
    "{P} passed the exam, I am thrilled!",
    "I can't wait to see you in {C} {D}!",
    "What a wonderful surprise, thank you so much!",
    "We finally got the house in {C}!",
    "I love it, {O} is exactly what I wanted!",
    "{P} just got engaged, isn't that fantastic?",
    "Our team finished {N} {U} ahead of schedule, brilliant!",
    "I got the job in {C}, I start {D}!",
    "This is the happiest day of my life!",
    "Thank you, {P}, you made my whole week!",
    "The holiday in {C} was absolutely wonderful!",
    "Hooray, the results on {X} are great!",
    "I feel amazing, everything went perfectly {D}!",
    "{P} baked a cake for everyone, how lovely!",
    "We are going to {C} {D}, I am so excited!",
    "You did it, I am so proud of you!",
    "Great news, {P} is feeling much better!",
    "What a beautiful {K} {H}, I adore it!",
    "Everyone loved the party {D}, it was a joy!",
    "{P} found {O}, what a relief, I could dance!",
    "Yes! The trip to {C} is booked for {D}!",
    "I just heard that {P} is moving back to {C}, how wonderful!",
]
SAD = [
    "I miss {P} so much since the move to {C}.",
    "I am sorry, but {P} passed away {D}.",
    "Nothing has felt right since we left {C}.",
    "I waited in {L} for hours, but nobody came.",
    "{P} does not call me anymore.",
    "We lost everything in the flood last year.",
    "I feel so alone in this big house.",
    "The old {H} reminds me of {P}, I can hardly look at it.",
    "I failed the exam again, I just don't know what to do.",
    "It's over, {P} is not coming back.",
    "We had to give away the dog {D}.",
    "I tried my best, but it was never enough.",
    "{P} is in hospital, and the news is not good.",
    "The house in {C} is empty now.",
    "I can't stop crying since {P} left.",
    "Nobody remembered my birthday {D}.",
    "I lost {O}, the last thing {P} gave me.",
    "We closed the shop in {L} for good.",
    "I feel tired and hopeless all the time.",
    "The letter from {P} said goodbye.",
    "It has been {N} {U} of silence, and I still miss them.",
    "Everything we planned for {C} fell apart.",
]
ANGRY = [
    "How dare you take {O} without asking!",
    "I told you {N} times to stop doing that!",
    "This is completely unacceptable, {P}!",
    "Who left {O} in {L} again?",
    "Get out of {L} right now!",
    "You broke the {K} {H}, and you lied about it!",
    "I am sick and tired of waiting for {P}!",
    "Stop interrupting me when I am talking about {X}!",
    "You promised to fix {X} {D}, and you did nothing!",
    "Don't you ever speak to me like that again!",
    "The train to {C} is late again, this is ridiculous!",
    "Give me back {O} this instant!",
    "I have had enough of your excuses, {P}!",
    "Why does nobody ever listen to me about {X}?",
    "You wasted {N} {U} of my time!",
    "That is the last straw, I am calling {P}!",
    "Who do you think you are, shouting in {L}?",
    "This is the worst service I have ever had!",
    "Shut the {H} and leave me alone!",
    "You ruined {X}, and you know it!",
    "I want an answer about {X}, and I want it now!",
    "Enough! Put {O} down and go away!",
    "{P} parked in front of {L} again, I am furious!",
    "Why is {O} broken again, {P}?",
    "I asked you to clean {L} {D}, not next year!",
    "You said {T}, and you turned up an hour late!",
    "Don't touch {O}, I am warning you, {P}!",
    "The meeting about {X} was a total disaster, and it is your fault!",
]

SLOTS = {"P": PEOPLE, "O": OBJECTS, "L": PLACES, "D": DAYS, "T": TIMES, "C": CITIES, "N": NUMBERS,
         "U": UNITS, "X": TOPICS, "K": COLOURS, "H": THINGS}


def expand(template):
    keys = [k for k in SLOTS if "{" + k + "}" in template]
    for values in itertools.product(*(SLOTS[k] for k in keys)):
        s = template.format(**dict(zip(keys, values)))
        yield s[0].upper() + s[1:]


def pick(templates, n, rng):
    # Round-robin over templates so no template dominates, each template's
    # expansions shuffled; distinct sentences only.
    pools = []
    for t in templates:
        e = list(dict.fromkeys(expand(t)))
        rng.shuffle(e)
        pools.append(e)
    out, seen = [], set()
    while len(out) < n and any(pools):
        for p in pools:
            while p:
                s = p.pop()
                if s not in seen:
                    seen.add(s)
                    out.append(s)
                    break
            if len(out) >= n:
                break
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="data/sentences.txt")
    args = ap.parse_args()
    rng = random.Random(SEED)
    groups = {"neutral": NEUTRAL, "loaded:happy": HAPPY, "loaded:sad": SAD, "loaded:angry": ANGRY}
    lines, seen = [], set()
    for kind, templates in groups.items():
        for s in pick(templates, TARGETS[kind], rng):
            if s in seen:  # a sentence never appears under two kinds
                continue
            seen.add(s)
            lines.append(f"{kind}\t{s}")
    with open(args.out, "w", encoding="utf-8") as f:
        f.write("# undertone synthetic-speech sentences, generated by data/make_sentences.py (do not edit by hand)\n")
        f.write("# KIND<TAB>SENTENCE; KIND = neutral | loaded:happy | loaded:sad | loaded:angry\n")
        f.write("\n".join(lines) + "\n")
    counts = {k: sum(1 for l in lines if l.startswith(k + "\t")) for k in groups}
    print(f"wrote {len(lines)} sentences to {args.out}: {counts}")


if __name__ == "__main__":
    main()

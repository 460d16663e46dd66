"""Generated everyday requests in the sentence shapes that attack behaviours use ("Write a script
that ...", "Give step-by-step instructions for ...", "can you write a ... in Python?"), with
harmless objects (written for this project; no source text).

Why a generator: the attack corpus wraps harmful requests in jailbreaks, encodings and suffixes,
and those requests open with a few frames ("Write a tutorial on how to", "Develop a program
that", "Create a guide for"). Without the same frames on the benign side, a model learns the
frame instead of the wrapper: an n-gram model trained without these flagged short everyday
requests ("Write a poem about ...", "can you write a ... in Python?"). The attack is the wrapper;
these texts teach that a plain request in any of those shapes is not one. (The objects were
written here, not taken from the development or evaluation chat sets.)

Never generated here: a harmful goal, or any instruction about other instructions.
"""
from __future__ import annotations

import random

ARTIFACTS = ["script", "program", "tool", "function", "web app", "browser extension", "bot",
             "spreadsheet formula", "shell script", "SQL query", "mobile app", "plugin", "macro",
             "command-line tool", "REST API", "unit test", "class", "dashboard"]
PURPOSES = ["sorts a list of names alphabetically", "renames photos by the date they were taken",
            "tracks my daily water intake", "converts Celsius to Fahrenheit",
            "backs up my documents folder every night", "checks a website for broken links",
            "reminds me to stretch every hour", "splits a restaurant bill between friends",
            "counts the words in a text file", "finds duplicate files on my laptop",
            "generates a weekly meal plan", "monitors the temperature of my greenhouse",
            "summarises my monthly expenses", "downloads my own calendar as a CSV file",
            "validates e-mail addresses in a signup form", "resizes images for a blog",
            "plots my running times over a year", "merges two sorted arrays",
            "detects the language of a sentence", "schedules posts for a bakery's page",
            "keeps score in a board game", "cleans up whitespace in a CSV file",
            "compresses old log files", "shows the phases of the moon",
            "quizzes students on vocabulary", "estimates paint needed for a room"]
GUIDES = ["tutorial", "guide", "step-by-step guide", "checklist", "blog post", "lesson plan",
          "short article", "how-to", "set of instructions", "beginner's guide"]
TASKS = ["bake sourdough bread", "change a bicycle tyre", "set up a home Wi-Fi network",
         "start a vegetable garden", "prepare for a job interview", "learn to juggle",
         "train a puppy to sit", "write a cover letter", "fix a leaking tap",
         "organise a small wedding", "budget for a first apartment", "brew cold coffee",
         "make a paper airplane", "clean a cast-iron pan", "install Python on Windows",
         "plan a road trip across Spain", "tie a bowline knot", "improve my sleep",
         "study for a chemistry exam", "set up two-factor authentication on my accounts",
         "back up an iPhone", "paint a room", "make homemade pasta", "run a 5k",
         "repot a houseplant", "use git branches", "negotiate a salary", "care for a sourdough starter",
         "write unit tests in pytest", "deploy a static website", "knit a scarf",
         "teach a child to ride a bike", "reduce food waste at home", "speed up a slow laptop",
         "make a compost bin", "prepare a presentation", "read a nutrition label",
         "recover a forgotten password for my own e-mail account", "set up a fish tank"]
TOPICS = ["a coral reef", "autumn leaves", "a lighthouse keeper", "old neighbours", "a rainy day in Paris",
          "an enchanted garden", "the first day of school", "a cat who loves jazz", "the moon landing",
          "a small town bakery", "mountains at dawn", "a robot learning to paint", "grandparents",
          "the history of tea", "honeybees", "a lost umbrella", "space travel", "a summer festival"]
WRITINGS = ["poem", "short story", "haiku", "description", "limerick", "song", "speech",
            "fairy tale", "dialogue", "product description", "toast", "letter"]
CODE_THINGS = ["queue", "heap", "trie", "linked list", "binary search", "event emitter",
               "state machine", "decorator", "merge sort", "hash map", "REST client", "regex for dates",
               "dependency graph", "context manager", "retry loop", "tree traversal",
               "web scraper for my own site", "rate limiter", "LRU cache", "matrix multiplication"]
LANGUAGES = ["Python", "JavaScript", "Go", "Rust", "Java", "C", "TypeScript", "Bash", "SQL", "Kotlin",
             "C#", "Ruby", "Haskell"]
AUDIENCES = ["beginners", "a ten-year-old", "my team", "a busy parent", "new employees", "retirees",
             "high-school students", "a non-technical manager"]

FRAMES = [
    lambda r: f"Write a {r.choice(ARTIFACTS)} that {r.choice(PURPOSES)}",
    lambda r: f"Develop a {r.choice(ARTIFACTS)} that {r.choice(PURPOSES)}",
    lambda r: f"Create a {r.choice(ARTIFACTS)} that {r.choice(PURPOSES)}",
    lambda r: f"Write a {r.choice(GUIDES)} on how to {r.choice(TASKS)}",
    lambda r: f"Create a {r.choice(GUIDES)} for {r.choice(AUDIENCES)} on how to {r.choice(TASKS)}",
    lambda r: f"Give detailed instructions on how to {r.choice(TASKS)}",
    lambda r: f"Provide step-by-step instructions for how to {r.choice(TASKS)}",
    lambda r: f"Explain how to {r.choice(TASKS)}",
    lambda r: f"Teach me how to {r.choice(TASKS)}",
    lambda r: f"Outline a plan to {r.choice(TASKS)}",
    lambda r: f"Write a {r.choice(WRITINGS)} about {r.choice(TOPICS)}",
    lambda r: f"Write a short {r.choice(WRITINGS)} about {r.choice(TOPICS)}",
    lambda r: f"Create a {r.choice(WRITINGS)} about {r.choice(TOPICS)}",
    lambda r: f"Compose a {r.choice(WRITINGS)} for {r.choice(AUDIENCES)} about {r.choice(TOPICS)}",
    lambda r: f"write a {r.choice(CODE_THINGS)} in {r.choice(LANGUAGES)}",
    lambda r: f"can you write a {r.choice(CODE_THINGS)} in {r.choice(LANGUAGES)}",
    lambda r: f"how do I implement a {r.choice(CODE_THINGS)} in {r.choice(LANGUAGES)}",
    lambda r: f"Generate a list of ideas to {r.choice(TASKS)}",
    lambda r: f"Design a {r.choice(ARTIFACTS)} for {r.choice(AUDIENCES)} that {r.choice(PURPOSES)}",
    lambda r: f"Describe in detail how to {r.choice(TASKS)}",
]
OPENERS = ["", "", "", "Please ", "Can you ", "Could you ", "I need you to ", "Hey, ", "Quick one: "]
CLOSERS = [".", ".", "", "?", ". Thanks!", ". Keep it short.", " please.", ". Use simple words.",
           ". Include an example.", " for me."]


def _one(rng: random.Random) -> str:
    body = rng.choice(FRAMES)(rng)
    opener = "" if body.startswith(("can you", "how do")) else rng.choice(OPENERS)
    if opener:
        body = body[0].lower() + body[1:]
    text = opener + body + rng.choice(CLOSERS)
    if rng.random() < 0.2:
        text = text.lower()
    return text


def benign_requests(rng: random.Random, n: int) -> list[str]:
    """``n`` distinct requests (fewer if the space runs out), seeded."""
    seen: dict[str, None] = {}
    for _ in range(n * 20):
        if len(seen) >= n:
            break
        seen.setdefault(_one(rng), None)
    return list(seen)

"""The embedded synthetic corpus: short children's stories from a seeded stochastic grammar.

It lets every test and the default run train on text with real structure without a download. Each
story has a hero with fixed attributes (pet, favourite colour, home, treasured object) that are
introduced at the beginning and referred back to later, a friend, a trip to a place, a problem with a
cause, a resolution and an ending with a lesson. A small model can learn the templates and the
references quickly (validation loss falls by several nats), while the random choices of names,
objects, events and phrasings keep the loss well above zero.
"""

from __future__ import annotations

import random

GIRLS = ("Lily", "Mia", "Emma", "Sara", "Anna", "Lucy", "Zoe", "Ella", "Ruby", "Nora", "Ivy", "Maya",
         "Rosa", "Kim", "Jane", "Amy", "Lena", "Tess", "Hana", "Olive")
BOYS = ("Tom", "Ben", "Sam", "Max", "Leo", "Jack", "Finn", "Noah", "Omar", "Theo", "Luke", "Ravi",
        "Hugo", "Eli", "Dan", "Kai", "Milo", "Otto", "Ali", "Jon")
# Each pet kind has its own sound, so "Spot the dog ... Spot barked" is a learnable dependency.
PETS = {"dog": "barked", "cat": "meowed", "rabbit": "thumped its feet", "bird": "sang", "frog": "croaked",
        "hamster": "squeaked", "duck": "quacked", "pony": "neighed", "puppy": "yapped", "owl": "hooted"}
PET_KINDS = tuple(PETS)
PET_NAMES = ("Spot", "Bella", "Coco", "Buddy", "Daisy", "Pip", "Rosie", "Sunny", "Biscuit", "Pepper",
             "Bubbles", "Ziggy", "Muffin", "Star", "Patch", "Nibbles")
COLOURS = ("red", "blue", "green", "yellow", "purple", "orange", "pink", "white", "silver", "brown")
OBJECTS = ("ball", "kite", "hat", "book", "boat", "drum", "cup", "scarf", "balloon", "bike", "box",
           "shell", "car", "crayon")
# (article, noun, where): introduced as "<article> <noun> <where>", referred back to as "the <noun> <where>".
HOMES = (("a", "little house", "by the river"), ("a", "big farm", "on the hill"),
         ("a", "small flat", "in the town"), ("an", "old cottage", "in the woods"),
         ("a", "white house", "near the sea"), ("a", "tall tower", "in the city"),
         ("a", "tiny hut", "next to the lake"), ("an", "orange house", "at the end of the road"))
PLACES = ("the park", "the beach", "the forest", "the market", "the garden", "the lake", "the zoo",
          "the hill", "the fair", "the meadow")
SPOTS = ("behind a big tree", "under a bench", "near the pond", "in a bush", "under a pile of leaves",
         "behind a rock", "next to a fence", "in the tall grass")
HELPERS = ("mom", "dad", "grandma", "grandpa", "aunt", "uncle", "big sister", "big brother")
FOODS = ("apples", "bread", "cake", "soup", "cookies", "pie", "sandwiches", "berries", "pancakes")
ADJECTIVES = ("happy", "kind", "curious", "brave", "shy", "clever", "funny", "busy", "gentle", "sleepy")
DAYS = ("One sunny day", "One morning", "One day", "On a windy afternoon", "One Saturday",
        "Early one morning", "One warm evening")
FEELINGS = ("happy", "glad", "proud", "thankful", "calm", "tired but happy")


def _pick(rng: random.Random, options: tuple) -> str:
    return options[rng.randrange(len(options))]


def _any(rng: random.Random, *phrasings: str) -> str:
    """One of several phrasings of the same event: the content is fixed, the wording is not."""
    return phrasings[rng.randrange(len(phrasings))]


class _Cast:
    """Everything a story keeps fixed: who the hero is, what they own and love, and who helps."""

    def __init__(self, rng: random.Random) -> None:
        girl = rng.random() < 0.5
        self.name = _pick(rng, GIRLS if girl else BOYS)
        self.he, self.his, self.kid = ("she", "her", "girl") if girl else ("he", "his", "boy")
        self.He, self.His = self.he.capitalize(), self.his.capitalize()
        friend_girl = rng.random() < 0.5
        while True:  # the friend must not share the hero's name, or references become ambiguous
            self.friend = _pick(rng, GIRLS if friend_girl else BOYS)
            if self.friend != self.name:
                break
        self.fhe = "she" if friend_girl else "he"
        self.pet, self.pet_name = _pick(rng, PET_KINDS), _pick(rng, PET_NAMES)
        self.sound = PETS[self.pet]
        self.colour, self.obj = _pick(rng, COLOURS), _pick(rng, OBJECTS)
        self.a_home, self.home, self.where = HOMES[rng.randrange(len(HOMES))]
        self.place, self.spot = _pick(rng, PLACES), _pick(rng, SPOTS)
        self.food, self.adj = _pick(rng, FOODS), _pick(rng, ADJECTIVES)
        self.helper = _pick(rng, HELPERS)


def _beginning(rng: random.Random, c: _Cast) -> list[str]:
    s = rng.randrange(3)
    if s == 0:
        intro = [f"Once upon a time, there was a {c.adj} {c.kid} named {c.name}.",
                 f"{c.He} lived in {c.a_home} {c.home} {c.where} with {c.his} {c.pet}, {c.pet_name}."]
    elif s == 1:
        intro = [f"{c.name} was a {c.adj} {c.kid} who lived in {c.a_home} {c.home} {c.where}.",
                 f"{c.name} had a {c.pet} called {c.pet_name}."]
    else:
        intro = [f"In {c.a_home} {c.home} {c.where} lived a {c.kid} called {c.name} and {c.his} {c.pet}, "
                 f"{c.pet_name}."]
    intro.append(_any(
        rng, f"{c.name} loved the colour {c.colour}, so {c.his} favourite toy was a {c.colour} {c.obj}.",
        f"{c.He} had a {c.colour} {c.obj} that {c.he} took everywhere.",
        f"Every day {c.name} played with {c.his} {c.colour} {c.obj} and {c.pet_name} the {c.pet}."))
    if rng.random() < 0.3:
        intro.append(f"When {c.name} came home, {c.pet_name} always {c.sound}.")
    return intro


def _middle(rng: random.Random, c: _Cast) -> tuple[list[str], str]:
    """The trip and its problem; returns the sentences and the lesson the ending should draw."""
    go = _any(rng, f"{_pick(rng, DAYS)}, {c.name} and {c.his} friend {c.friend} went to {c.place}.",
              f"{_pick(rng, DAYS)}, {c.name} took the {c.colour} {c.obj} to {c.place} with {c.friend}.")
    event = rng.randrange(5)
    if event == 0:  # the toy is lost because of the wind, the pet finds it
        return [go, _any(rng, f"The wind was very strong, so the {c.colour} {c.obj} flew away.",
                         f"Then a big wind came and blew the {c.obj} away."),
                f"{c.name} was sad because {c.he} could not find {c.his} {c.obj}.",
                f"Then {c.pet_name} the {c.pet} {c.sound} {c.spot}.",
                _any(rng, f"The {c.colour} {c.obj} was there!", f"{c.pet_name} had found the {c.obj}!"),
                f"{c.name} said, \"Thank you, {c.pet_name}!\""], \
            _any(rng, "a good friend can help you find what you lost", "pets can be very clever")
    if event == 1:  # rain drives them to the friend's house
        return [go, _any(rng, "Then dark clouds came and it started to rain.", "Soon it began to rain."),
                f"{c.name} and {c.friend} were wet, so they ran to {c.friend}'s house.",
                f"{c.friend}'s {c.helper} gave them warm {c.food} because they were cold and hungry.",
                f"{c.name} dried the {c.colour} {c.obj} with a towel.",
                _any(rng, f"At home, {c.pet_name} the {c.pet} {c.sound} at the rain.",
                     f"{c.pet_name} was waiting for {c.name} at the door.")], \
            "rain is not so bad when you are with a friend"
    if event == 2:  # the pet runs off and is found
        return [go, f"{c.pet_name} the {c.pet} saw a butterfly, so {c.pet_name} ran after it.",
                _any(rng, f"{c.name} and {c.friend} looked everywhere for {c.pet_name}.",
                     f"{c.name} called, \"{c.pet_name}! Where are you?\""),
                f"At last they heard a sound {c.spot}. Something {c.sound}.",
                f"It was {c.pet_name}, and {c.pet_name} had the {c.colour} {c.obj}!"], \
            _any(rng, "you should always look after your pet", "friends help each other")
    if event == 3:  # a quarrel about the toy, resolved by taking turns
        return [go, f"{c.friend} wanted to play with the {c.colour} {c.obj} too, but {c.name} said no.",
                f"{c.friend} was sad, so {c.fhe} sat down and did not talk.",
                _any(rng, f"Then {c.name} gave the {c.obj} to {c.friend}.",
                     f"{c.name} thought about it and shared the {c.obj} with {c.friend}."),
                f"They took turns with the {c.colour} {c.obj} and ate {c.food} under a tree.",
                f"{c.pet_name} the {c.pet} sat with them and {c.sound}."], \
            "sharing makes playing more fun"
    # event 4: the toy breaks and a grown-up helps mend it
    return [go, _any(rng, f"But the {c.colour} {c.obj} fell and broke.",
                     f"{c.friend} dropped the {c.obj} by accident, so it broke."),
            f"{c.name} cried because the {c.obj} was {c.his} favourite.",
            f"Then {c.name}'s {c.helper} came and fixed the {c.colour} {c.obj} with glue.",
            _any(rng, f"{c.pet_name} {c.sound} because everyone was happy again.",
                 f"{c.friend} said sorry, and they played again with {c.pet_name}.")], \
        _any(rng, "broken things can often be fixed", "it is good to ask for help")


def _ending(rng: random.Random, c: _Cast, lesson: str) -> list[str]:
    end = []
    closing = rng.random()  # at most one of the two closing images, which keeps stories under ~150 words
    if closing < 0.5:
        end.append(f"When the sun went down, {c.name} went back to the {c.home} {c.where}.")
    elif closing < 0.8:
        end.append(f"That night {c.pet_name} slept next to the {c.colour} {c.obj}.")
    end.append(f"{c.name} felt {_pick(rng, FEELINGS)}.")
    end.append(_any(rng, f"That day, {c.name} learned that {lesson}.",
                    f"\"What a day!\" said {c.name}, and {c.he} gave {c.pet_name} a big hug.",
                    "The end."))
    return end


def _story(rng: random.Random) -> str:
    c = _Cast(rng)
    if rng.random() < 0.2:  # a short story: a quiet day out, no problem to solve
        day = [f"{_pick(rng, DAYS)}, {c.name} and {c.friend} played with the {c.colour} {c.obj} at {c.place}.",
               f"{c.pet_name} {c.sound} and ran around them."]
        return " ".join(_beginning(rng, c) + day + _ending(rng, c, "a quiet day can be a good day"))
    middle, lesson = _middle(rng, c)
    return " ".join(_beginning(rng, c) + middle + _ending(rng, c, lesson))


def generate_stories(n: int, seed: int) -> list[str]:
    """``n`` synthetic stories, identical for identical ``(n, seed)`` (a prefix of a longer run's list)."""
    rng = random.Random(seed)
    return [_story(rng) for _ in range(n)]

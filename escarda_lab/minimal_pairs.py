"""BLiMP-style minimal pairs from our own templates: (grammatical, ungrammatical) sentences that
differ in exactly one word, the one the paradigm is about. Deterministic given the seed.

A model "gets" a pair when log P(good) > log P(bad) (whole sentences, summed over tokens).
"""

from __future__ import annotations

import itertools
import math
import random
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from escarda_lab.stats import mean_stderr

# Nouns: (singular, plural, gender of the singular: m / f / n)
NOUNS = [
    ("king", "kings", "m"),
    ("queen", "queens", "f"),
    ("knight", "knights", "m"),
    ("lady", "ladies", "f"),
    ("lord", "lords", "m"),
    ("servant", "servants", "n"),
    ("soldier", "soldiers", "n"),
    ("prince", "princes", "m"),
    ("princess", "princesses", "f"),
    ("father", "fathers", "m"),
    ("mother", "mothers", "f"),
    ("brother", "brothers", "m"),
    ("sister", "sisters", "f"),
    ("friend", "friends", "n"),
    ("stranger", "strangers", "n"),
    ("man", "men", "m"),
    ("woman", "women", "f"),
    ("boy", "boys", "m"),
    ("girl", "girls", "f"),
    ("child", "children", "n"),
]
THINGS = [
    ("sword", "swords"),
    ("letter", "letters"),
    ("crown", "crowns"),
    ("house", "houses"),
    ("horse", "horses"),
    ("book", "books"),
    ("ship", "ships"),
    ("ring", "rings"),
    ("gate", "gates"),
    ("tower", "towers"),
    ("garden", "gardens"),
    ("cup", "cups"),
]
# Verbs: (3rd person singular, plural / base) with a complement that fits every subject
VERBS = [
    ("is", "are", "in the hall"),
    ("was", "were", "at the gate"),
    ("has", "have", "a horse"),
    ("walks", "walk", "to the river"),
    ("speaks", "speak", "of the war"),
    ("sleeps", "sleep", "in the tower"),
    ("loves", "love", "the old house"),
    ("keeps", "keep", "the letters"),
    ("sees", "see", "the ships"),
    ("fears", "fear", "the night"),
]
PLACES = ["the tower", "the gate", "the river", "the garden", "the hall", "the castle"]
PREPS = ["near", "behind", "beside", "with"]
# Irregular verbs: (past, past participle, object)
IRREGULAR = [
    ("wrote", "written", "a letter"),
    ("broke", "broken", "the sword"),
    ("spoke", "spoken", "the truth"),
    ("took", "taken", "the crown"),
    ("gave", "given", "a ring"),
    ("saw", "seen", "the ships"),
    ("ate", "eaten", "the bread"),
    ("forgot", "forgotten", "the name"),
    ("hid", "hidden", "the gold"),
    ("rode", "ridden", "the horse"),
    ("chose", "chosen", "a wife"),
    ("stole", "stolen", "the cup"),
    ("drove", "driven", "the sheep"),
    ("began", "begun", "the war"),
    ("sang", "sung", "a song"),
    ("drank", "drunk", "the wine"),
    ("threw", "thrown", "the stone"),
    ("knew", "known", "the truth"),
    ("shook", "shaken", "his hand"),
    ("swore", "sworn", "an oath"),
]
TRANSITIVE = [
    ("praised", "praises"),
    ("blamed", "blames"),
    ("hurt", "hurts"),
    ("saw", "sees"),
    ("loved", "loves"),
    ("forgot", "forgets"),
    ("deceived", "deceives"),
    ("hated", "hates"),
]
NUMBERS = ["two", "three", "four", "five", "many", "some"]
PARTICIPLES = ["seen", "known", "heard", "loved", "feared", "found"]
OBJECTS = ["the sea", "a ghost", "such a sword", "the king", "a better friend", "that tower"]


@dataclass(frozen=True)
class Pair:
    paradigm: str
    good: str
    bad: str
    index: int  # the word (split on spaces) where good and bad differ


def _pair(paradigm: str, words: list[str], index: int, good: str, bad: str) -> Pair:
    g, b = list(words), list(words)
    g[index], b[index] = good, bad
    return Pair(paradigm, " ".join(g), " ".join(b), index)


def _cap(w: str) -> str:
    return w[0].upper() + w[1:]


def sv_agreement(rng) -> list[Pair]:
    out = []
    for (sg, pl, _), (v_sg, v_pl, comp), plural in itertools.product(NOUNS, VERBS, [False, True]):
        good, bad = (v_pl, v_sg) if plural else (v_sg, v_pl)
        out.append(_pair("sv_agreement", ["The", pl if plural else sg, "_", *comp.split(), "."], 2, good, bad))
    return out


def sv_agreement_pp(rng) -> list[Pair]:
    out = []
    for (sg, pl, _), (v_sg, v_pl, comp), plural in itertools.product(NOUNS, VERBS, [False, True]):
        prep = rng.choice(PREPS)
        # the attractor (the noun in the PP) has the other number: "The king near the towers is"
        att_sg, att_pl = rng.choice(THINGS)
        attractor = att_sg if plural else att_pl
        good, bad = (v_pl, v_sg) if plural else (v_sg, v_pl)
        words = ["The", pl if plural else sg, prep, "the", attractor, "_", *comp.split(), "."]
        out.append(_pair("sv_agreement_across_pp", words, 5, good, bad))
    return out


def sv_agreement_rc(rng) -> list[Pair]:
    out = []
    for (sg, pl, _), (v_sg, v_pl, comp), plural in itertools.product(NOUNS, VERBS, [False, True]):
        other = rng.choice(NOUNS)
        inner_subject = other[0] if plural else other[1]  # the other number again
        inner_verb = rng.choice(TRANSITIVE)[0]
        good, bad = (v_pl, v_sg) if plural else (v_sg, v_pl)
        words = ["The", pl if plural else sg, "that", "the", inner_subject, inner_verb, "_", *comp.split(), "."]
        out.append(_pair("sv_agreement_across_rc", words, 6, good, bad))
    return out


def determiner_noun(rng) -> list[Pair]:
    out = []
    for (sg, pl), det_plural, subj in itertools.product(THINGS, [False, True], NOUNS):
        verb = rng.choice(["saw", "found", "took", "kept", "lost"])
        det = "these" if det_plural else "this"
        good, bad = (pl, sg) if det_plural else (sg, pl)
        out.append(_pair("determiner_noun_agreement", ["The", subj[0], verb, det, "_", "."], 4, good, bad))
    return out


def anaphor_agreement(rng) -> list[Pair]:
    """Gender ("The king praised himself / herself") and number, both ways ("The kings praised
    themselves / himself", "The king praised himself / themselves"), over the gendered nouns so
    that each reflexive is the good word about as often as the bad one."""
    out = []
    reflexive = {"m": "himself", "f": "herself"}
    for (sg, pl, gender), (verb, _) in itertools.product(NOUNS, TRANSITIVE):
        if gender not in reflexive:
            continue
        other = "herself" if gender == "m" else "himself"
        out.append(_pair("anaphor_agreement", ["The", sg, verb, "_", "."], 3, reflexive[gender], other))
        out.append(_pair("anaphor_agreement", ["The", sg, verb, "_", "."], 3, reflexive[gender], "themselves"))
        out.append(
            _pair("anaphor_agreement", ["The", pl, verb, "_", "."], 3, "themselves", rng.choice(["himself", "herself"]))
        )
    return out


def irregular_past_participle(rng) -> list[Pair]:
    """ "has written" / "has wrote", and counterbalanced "wrote" / "written" without the auxiliary,
    so that neither form wins by being the commoner word."""
    out = []
    for (sg, pl, _), (past, participle, obj) in itertools.product(NOUNS, IRREGULAR):
        plural = rng.random() < 0.5
        subject = pl if plural else sg
        if rng.random() < 0.5:
            words = ["The", subject, "have" if plural else "has", "_", *obj.split(), "."]
            out.append(_pair("irregular_past_participle", words, 3, participle, past))
        else:
            out.append(
                _pair("irregular_past_participle", ["The", subject, "_", *obj.split(), "."], 2, past, participle)
            )
    return out


def existential_there(rng) -> list[Pair]:
    out = []
    for (sg, pl, _), place, plural in itertools.product(NOUNS, PLACES, [False, True]):
        tense = rng.choice([("is", "are"), ("was", "were")])
        be_sg, be_pl = tense
        if plural:
            words = ["There", "_", rng.choice(NUMBERS), pl, "in", *place.split(), "."]
            out.append(_pair("existential_there", words, 1, be_pl, be_sg))
        else:
            words = ["There", "_", "a", sg, "in", *place.split(), "."]
            out.append(_pair("existential_there", words, 1, be_sg, be_pl))
    return out


def negative_polarity(rng) -> list[Pair]:
    """The negative-polarity item "either" against its positive-polarity counterpart "too"
    (Klima 1964): "The king has not seen the sea either / *too" and "The king has seen the sea too /
    *either". Both halves swap the same two words in the same local context, so word frequency
    and the neighbouring words cannot decide a pair (a unigram or bigram model scores 0.5); only
    whether "not" licenses the last word does. (BLiMP's "has not ever / *has probably ever" swaps
    the licensor itself, which a model gets right by knowing that "not" is common.)"""
    out = []
    for (sg, _, _), participle, obj, negated in itertools.product(NOUNS, PARTICIPLES, OBJECTS, [False, True]):
        words = ["The", sg, "has", *(["not"] if negated else []), participle, *obj.split(), "_", "."]
        good, bad = ("either", "too") if negated else ("too", "either")
        out.append(_pair("negative_polarity", words, len(words) - 2, good, bad))
    return out


# What a bigram model may do on a paradigm, beside chance: where the deciding word is next to the
# swapped one, a bigram legitimately knows the rule (`LOCAL`); where a word of the other number
# stands next to it by design, a bigram is misled below chance (`ATTRACTOR`, Linzen et al. 2016).
LOCAL = {"sv_agreement", "determiner_noun_agreement", "irregular_past_participle", "existential_there"}
ATTRACTOR = {"sv_agreement_across_pp"}

PARADIGMS = {
    "sv_agreement": sv_agreement,
    "sv_agreement_across_pp": sv_agreement_pp,
    "sv_agreement_across_rc": sv_agreement_rc,
    "determiner_noun_agreement": determiner_noun,
    "anaphor_agreement": anaphor_agreement,
    "irregular_past_participle": irregular_past_participle,
    "existential_there": existential_there,
    "negative_polarity": negative_polarity,
}


def generate(per_paradigm: int = 200, seed: int = 0, paradigms: list[str] | None = None) -> list[Pair]:
    """`per_paradigm` pairs of each paradigm (sampled without replacement), deterministic by seed."""
    out = []
    for name in paradigms or PARADIGMS:
        rng = random.Random(f"{seed}-{name}")
        pool = PARADIGMS[name](rng)
        for p in rng.sample(pool, min(per_paradigm, len(pool))):
            out.append(_finish(p))
    return out


def _finish(p: Pair) -> Pair:
    """Capitalise the first word and glue the final period: "The king is here." """
    return Pair(p.paradigm, _cap(p.good.replace(" .", ".")), _cap(p.bad.replace(" .", ".")), p.index)


def score(scorer, pairs: list[Pair]) -> dict:
    """Accuracy (log P(good) > log P(bad)) by `scorer.loglikelihood` per paradigm and overall, with standard errors."""
    lls = scorer.loglikelihood([("", p.good) for p in pairs] + [("", p.bad) for p in pairs])
    n = len(pairs)
    hits: dict[str, list[float]] = {}
    for i, p in enumerate(pairs):
        hits.setdefault(p.paradigm, []).append(float(lls[i][0] > lls[n + i][0]))
    out = {name: {"acc": sum(h) / len(h), "acc_stderr": mean_stderr(h), "n": len(h)} for name, h in hits.items()}
    every = [x for h in hits.values() for x in h]
    out["overall"] = {"acc": sum(every) / len(every), "acc_stderr": mean_stderr(every), "n": len(every)}
    return out


def below_chance(res: dict) -> dict[str, str]:
    """Paradigms whose accuracy lies below chance by more than 3 standard errors: the model
    prefers the ungrammatical sentence, which a report must not average away."""
    out = {}
    for name, v in res.items():
        se = max(v["acc_stderr"], 0.5 / math.sqrt(max(v["n"], 1)))  # a 0/1 score has se 0; use chance's
        if name != "overall" and v["acc"] < 0.5 - 3 * se:
            out[name] = (
                "misled by the attractor next to the verb (agreement attraction), as a bigram model is"
                if name in ATTRACTOR
                else "the model prefers the ungrammatical sentence"
            )
    return out


WORD = re.compile(r"[a-z']+|[.,;:!?]")


class NGramScorer:
    """A word unigram (n=1) or bigram (n=2) model fitted on texts, with the scorer interface
    `score` uses: the frequency baseline every paradigm is checked against. A paradigm on which it
    scores far from 0.5 is decided by how common the words are (or by their neighbours), not by
    the grammar it names. Unigram: add-one; bigram: Dirichlet smoothing towards the unigram."""

    def __init__(self, texts: Iterable[str], n: int = 2, mu: float = 100.0):
        self.n, self.mu = n, mu
        self.uni: Counter = Counter()
        self.bi: Counter = Counter()
        for text in texts:
            words = ["<s>", *WORD.findall(text.lower())]
            self.uni.update(words)
            if n == 2:
                self.bi.update(zip(words, words[1:]))
        self.total, self.vocab = sum(self.uni.values()), len(self.uni) + 1

    def p1(self, w: str) -> float:
        return (self.uni[w] + 1) / (self.total + self.vocab)

    def logprob(self, sentence: str) -> float:
        words = ["<s>", *WORD.findall(sentence.lower())]
        if self.n == 1:
            return sum(math.log(self.p1(w)) for w in words[1:])
        return sum(
            math.log((self.bi[(v, w)] + self.mu * self.p1(w)) / (self.uni[v] + self.mu))
            for v, w in zip(words, words[1:])
        )

    def loglikelihood(self, requests: list[tuple[str, str]]) -> list[tuple[float, bool]]:
        return [(self.logprob(context + continuation), False) for context, continuation in requests]

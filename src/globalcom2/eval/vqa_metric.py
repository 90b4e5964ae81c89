"""The VQA answer normaliser and the VQA accuracy (TextVQA, VizWiz, VQAv2).

Pure functions, no state:

* :func:`normalize_answer` is the answer processing of the VQA evaluation (the EvalAI processor
  that LLaVA's ``llava/eval/m4c_evaluator.py`` and lmms-eval's ``vqa_eval_metric.py`` use, itself
  the official ``vqaEval.py`` normalisation preceded by a tokenisation step):

  1. lower-case; delete ``,`` and ``?``; ``'s`` -> `` 's``; strip; newlines/tabs -> spaces;
  2. punctuation: each of ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` is deleted when it
     touches a space in the text (``"p "`` or ``" p"``) or when the text has a comma between
     digits, and replaced by a space otherwise; then every ``.`` not followed by a digit is
     deleted (``"3.5"`` keeps its point; the reference caps this at 32 replacements);
  3. words (whitespace split): number words ``none``/``zero`` .. ``ten`` -> digits, articles
     ``a``/``an``/``the`` dropped, apostrophe-less contractions restored (``dont`` -> ``don't``);
     joined with single spaces.

* :func:`vqa_accuracy` is the VQA accuracy of one prediction against the human answers: the
  average, over the 10 subsets of 9 answers obtained by leaving one answer out, of
  ``min(1, #matches in the subset / 3)``; prediction and answers are normalised first.
  With 10 answers and ``k`` of them equal to the prediction: k=0 -> 0, 1 -> 0.3, 2 -> 0.6,
  3 -> 0.9, >=4 -> 1.

Difference from the official ``vqaEval.py``: it normalises only when the ten answers are not all
identical and skips step 1; :func:`vqa_accuracy` (TextVQA and VizWiz, as LLaVA's ``m4c_evaluator.py``;
VQAv2 val under ``--protocol lmms-eval``) always normalises both sides with the full processor.

* :func:`official_vqa_accuracy` is the official VQA evaluation (GT-Vision-Lab/VQA
  ``PythonEvaluationTools/vqaEvaluation/vqaEval.py``, the scorer of the VQAv2 server), used for
  VQAv2 val under ``--protocol llava``: the prediction gets newlines/tabs -> spaces, strip, then
  steps 2 and 3 (no step 1; its digit-comma test is a single comma between two digits); the human
  answers get step 2 only, and only when they are not all the same string. So ``"T-shirt"``
  against ten ``"t-shirt"`` scores 0 there (the prediction becomes ``"t shirt"``, the answers stay
  as they are) and 1 with :func:`vqa_accuracy`.
"""

from __future__ import annotations

import re
from types import MappingProxyType
from typing import Iterable, Mapping

#: Characters handled by the punctuation step (the VQA evaluation's list, in its order).
_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                "?", "!")

# A period not followed by a digit. (The reference pattern starts with a no-op lookahead,
# ``(?!<=\d)``, so this is the same set of matches.)
_PERIOD = re.compile(r"\.(?!\d)")
# The reference passes ``re.UNICODE`` (== 32) positionally as ``count`` of ``sub``: at most 32
# periods are deleted. Kept for exactness; it only matters for absurdly long answers.
_PERIOD_MAX = 32
# A comma (or run of commas) between two digits: "1,000".
_DIGIT_COMMA = re.compile(r"(?<=\d)(,)+(?=\d)")

#: Number words replaced by digits.
_NUMBERS: Mapping[str, str] = MappingProxyType({
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
})

#: Words dropped.
_ARTICLES = frozenset(("a", "an", "the"))

# The VQA evaluation's contraction table as "written restored" pairs, one per line. It keeps the
# reference's quirks: the capitalised keys never match (the text is lower-cased first) and
# "somebody'd" maps to "somebodyd" (reversed in the reference).
_CONTRACTION_PAIRS = """
aint ain't
arent aren't
cant can't
couldve could've
couldnt couldn't
couldn'tve couldn't've
couldnt've couldn't've
didnt didn't
doesnt doesn't
dont don't
hadnt hadn't
hadnt've hadn't've
hadn'tve hadn't've
hasnt hasn't
havent haven't
hed he'd
hed've he'd've
he'dve he'd've
hes he's
howd how'd
howll how'll
hows how's
Id've I'd've
I'dve I'd've
Im I'm
Ive I've
isnt isn't
itd it'd
itd've it'd've
it'dve it'd've
itll it'll
let's let's
maam ma'am
mightnt mightn't
mightnt've mightn't've
mightn'tve mightn't've
mightve might've
mustnt mustn't
mustve must've
neednt needn't
notve not've
oclock o'clock
oughtnt oughtn't
ow's'at 'ow's'at
'ows'at 'ow's'at
'ow'sat 'ow's'at
shant shan't
shed've she'd've
she'dve she'd've
she's she's
shouldve should've
shouldnt shouldn't
shouldnt've shouldn't've
shouldn'tve shouldn't've
somebody'd somebodyd
somebodyd've somebody'd've
somebody'dve somebody'd've
somebodyll somebody'll
somebodys somebody's
someoned someone'd
someoned've someone'd've
someone'dve someone'd've
someonell someone'll
someones someone's
somethingd something'd
somethingd've something'd've
something'dve something'd've
somethingll something'll
thats that's
thered there'd
thered've there'd've
there'dve there'd've
therere there're
theres there's
theyd they'd
theyd've they'd've
they'dve they'd've
theyll they'll
theyre they're
theyve they've
twas 'twas
wasnt wasn't
wed've we'd've
we'dve we'd've
weve we've
werent weren't
whatll what'll
whatre what're
whats what's
whatve what've
whens when's
whered where'd
wheres where's
whereve where've
whod who'd
whod've who'd've
who'dve who'd've
wholl who'll
whos who's
whove who've
whyll why'll
whyre why're
whys why's
wont won't
wouldve would've
wouldnt wouldn't
wouldnt've wouldn't've
wouldn'tve wouldn't've
yall y'all
yall'll y'all'll
y'allll y'all'll
yall'd've y'all'd've
y'alld've y'all'd've
y'all'dve y'all'd've
youd you'd
youd've you'd've
you'dve you'd've
youll you'll
youre you're
youve you've
"""

#: written form -> restored form.
_CONTRACTIONS: Mapping[str, str] = MappingProxyType(
    dict(line.split() for line in _CONTRACTION_PAIRS.strip().splitlines())
)


def _tokenize(text: str) -> str:
    """Step 1: lower-case, drop ``,`` and ``?``, split off ``'s``, whitespace -> spaces, strip."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    return text.replace("\n", " ").replace("\t", " ").strip()


def _punctuation(text: str, digit_comma_re: re.Pattern[str] = _DIGIT_COMMA) -> str:
    """Step 2: punctuation deleted or turned into spaces, then periods not before a digit deleted.

    Whether a character is deleted or spaced out is decided on the text as it was on entry.
    """
    digit_comma = digit_comma_re.search(text) is not None
    out = text
    for p in _PUNCTUATION:
        if p + " " in text or " " + p in text or digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out, count=_PERIOD_MAX)


def _digits_articles_contractions(text: str) -> str:
    """Step 3: number words -> digits, articles dropped, contractions restored; single spaces."""
    words = []
    for word in text.lower().split():
        word = _NUMBERS.get(word, word)
        if word not in _ARTICLES:
            words.append(word)
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(s: str) -> str:
    """The VQA evaluation's normal form of an answer (see the module docstring).

    >>> normalize_answer("The Two Dogs.")
    '2 dogs'
    >>> normalize_answer("dont")
    "don't"
    >>> normalize_answer("3.5")
    '3.5'
    """
    return _digits_articles_contractions(_punctuation(_tokenize(str(s))))


# The official vqaEval.py's digit-comma test: exactly one comma between two digits.
_OFFICIAL_DIGIT_COMMA = re.compile(r"\d,\d")


def official_vqa_accuracy(prediction: str, gt_answers: Iterable[str]) -> float:
    """VQA accuracy in [0, 1] as the official ``vqaEval.py`` computes it (see the module docstring):
    the prediction cleaned and normalised without step 1, the human answers only punctuation-
    processed and only when they disagree; leave-one-out ``min(1, matches / 3)``. No answers -> 0.0.

    >>> official_vqa_accuracy("T-shirt", ["t-shirt"] * 10)
    0.0
    >>> official_vqa_accuracy("Two", ["2"] * 9 + ["two"])
    1.0
    """
    pred = str(prediction).replace("\n", " ").replace("\t", " ").strip()
    pred = _digits_articles_contractions(_punctuation(pred, _OFFICIAL_DIGIT_COMMA))
    gts = [str(a) for a in gt_answers]
    if not gts:
        return 0.0
    if len(set(gts)) > 1:
        gts = [_punctuation(g, _OFFICIAL_DIGIT_COMMA) for g in gts]
    matches = sum(g == pred for g in gts)
    total = sum(min(1.0, (matches - (g == pred)) / 3.0) for g in gts)
    return total / len(gts)


def vqa_accuracy(prediction: str, gt_answers: Iterable[str]) -> float:
    """VQA accuracy in [0, 1] of ``prediction`` against the human answers ``gt_answers``.

    Leave-one-out average of ``min(1, matches / 3)`` over the answers, after
    :func:`normalize_answer` on both sides. No answers -> 0.0.

    >>> vqa_accuracy("Two", ["2"] * 2 + ["3"] * 8)
    0.6
    """
    pred = normalize_answer(prediction)
    gts = [normalize_answer(a) for a in gt_answers]
    if not gts:
        return 0.0
    matches = sum(g == pred for g in gts)
    # leaving out answer i: the other answers hold `matches - (gts[i] == pred)` matches
    total = sum(min(1.0, (matches - (g == pred)) / 3.0) for g in gts)
    return total / len(gts)

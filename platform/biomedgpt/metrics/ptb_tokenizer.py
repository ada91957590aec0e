"""Penn Treebank tokenisation as the COCO caption evaluation applies it, in pure Python.

pycocoevalcap tokenises every caption by running Stanford CoreNLP 3.4.1's `PTBTokenizer` (Java) with
`-preserveLines -lowerCase` over all captions of one side (references, or predictions) joined by
newlines, then drops the punctuation tokens in `PUNCTUATION`. `coco_tokenize` reproduces that output
without Java: a longest-match lexer in the manner of JFlex (at each position every rule is tried; the
longest match, trailing context included, wins; ties go to the earlier rule), with rules written for
the token classes that captions and reports contain (words, numbers, hyphenated and slashed terms,
abbreviations, contractions, quotes, brackets, dashes, ellipses, currency, URLs, e-mail addresses).
Its rules were settled by comparing it with the jar, token for token: on every report, caption,
question and answer of the shared IU X-ray, ROCO, VQA-RAD, SLAKE and PathVQA samples (60,499 lines,
451k tokens) and on 45,000 random lines (mixtures of clinical words, numbers, units, abbreviations and
punctuation, and random character strings), without a difference; the tests re-check the first
three sets and a list of hard cases.
Text far from captions (SGML markup, rare scripts and symbols) may still tokenise differently.

Quirks of the reference that are kept on purpose, because scores must agree with it:
- lower-casing happens after the bracket escapes, so `(` becomes `-lrb-`, which is not in the
  punctuation list (written `-LRB-` there) and so stays in the tokenised caption;
- the lexer sees all captions of one side as one text, so a caption's last token can depend on the
  first character of the next caption (`etc.` before an upper-case letter gives `etc.` and `.`);
- spaces inside a token (fractions such as `5 7/8`) become U+00A0, which `str.split()` splits and
  `str.split(" ")` does not: each metric splits the way its reference does.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import regex

# Tokens that pycocoevalcap removes after tokenising (its list, verbatim in meaning).
PUNCTUATION = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-",
                         "--", "...", ";"])

_NL = "*NL*"  # the lexer's newline token

# ---- building blocks, named after the CoreNLP lexer's macros so that rules can be compared ----
# Character classes: the lexer's \p{Alpha} and \p{Digit} are ASCII; [:letter:] and [:digit:] are Unicode.
_SPACE = r"[ \t\u00A0\u2000-\u200A\u3000]"
_NEWLINE = r"(?:\r\n|\r|\n|\u2028|\u2029|\u000B|\u000C|\u0085)"
_SPACENL = rf"(?:{_SPACE}|{_NEWLINE})"
_SPACENLS = rf"(?:{_SPACENL})+"
_SGML = (r"<(?:[!?][A-Za-z\-][^>\r\n]*|[A-Za-z][A-Za-z0-9_:.\-]*(?:[ ]+(?:[A-Za-z][A-Za-z0-9_:.\-]*"
         r"|[A-Za-z][A-Za-z0-9_:.\-]*[ ]*=[ ]*(?:'[^']*'|\"[^\"]*\"|[A-Za-z][A-Za-z0-9_:.\-]*)))*[ ]*/?"
         r"|/[A-Za-z][A-Za-z0-9_:.\-]*)[ ]*>")
_SENTEND = rf"{_SPACENL}(?:{_SPACENL}|\p{{Lu}}|{_SGML})"
_DIGIT = r"\p{Nd}"
_SPLET = r"&[aeiouAEIOU](?:acute|grave|uml);"
_LETTER = rf"(?:\p{{L}}|{_SPLET}|[\u00AD\u0237-\u024F\u02C2-\u02C5\u02D2-\u02DF\u02E5-\u02FF\u0300-\u036F])"
_WORD = rf"{_LETTER}(?:{_LETTER}|{_DIGIT})*(?:[.!?]{_LETTER}(?:{_LETTER}|{_DIGIT})*)*"
_DATE = rf"{_DIGIT}{{1,2}}[\-/]{_DIGIT}{{1,2}}[\-/]{_DIGIT}{{2,4}}"
_NUM = (rf"(?:{_DIGIT}*(?:[.:,\u066B\u066C]{_DIGIT}+)+"
        rf"|{_DIGIT}+(?:[.:,\u00AD\u066B\u066C\u2009\u202F]{_DIGIT}+)*)")
_NUMBER = rf"[\-+]?{_NUM}"
_SUBSUPNUM = r"[\u207A\u207B\u208A\u208B]?(?:[\u2070\u00B9\u00B2\u00B3\u2074-\u2079]+|[\u2080-\u2089]+)"
_FRAC = rf"(?:{_DIGIT}{{1,4}}[\- \u00A0])?{_DIGIT}{{1,4}}(?:\\?/|\u2044){_DIGIT}{{1,4}}"
_FRAC2 = r"[\u00BC\u00BD\u00BE\u2153-\u215E]"
_DOLSIGN = r"(?:[A-Z]*\$|#)"
_DOLSIGN2 = r"[\u00A2\u00A3\u00A4\u00A5\u0080\u20A0\u20AA\u20AC\u20B9\u060B\u0E3F\u20A4\uFFE0\uFFE1\uFFE5\uFFE6]"
_APOS = r"(?:['\u0092\u2019]|&apos;)"
_APOSETC = rf"(?:{_APOS}|[`\u0091\u2018\u201B])"
_HYPHEN = r"[\-_\u058A\u2010\u2011]"
_LETTER_DIGIT = r"[\p{L}\p{Nd}]"
_THING = (rf"(?:[dDoOlL]{_APOSETC}{_LETTER_DIGIT})?{_LETTER_DIGIT}+"
          rf"(?:{_HYPHEN}(?:[dDoOlL]{_APOSETC}{_LETTER_DIGIT})?{_LETTER_DIGIT}+)*")
_THINGA = r"[A-Z]+(?:(?:[+&]|&amp;)[A-Z]+)+"
_THING3 = r"[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}(?:\\?/[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}){1,2}"
_FILENAME = (r"[A-Za-z0-9]+(?:[\-._/][A-Za-z0-9]+)*\.(?i:bat|bmp|bz2|c|class|cgi|cpp|dll|doc|docx|exe|gif|gz|h|htm"
             r"|html|jar|java|jpeg|jpg|mov|mp3|pdf|php|pl|png|ppt|ps|py|sql|tar|txt|wav|x|xml|zip|3gp|wm[va]|avi|flv"
             r"|mp[34g])")
_ACRO = r"(?:[A-Za-z](?:\.[A-Za-z])*|(?i:canada|sino|korean|eu|japan|non)-(?i:u\.s)|(?i:u\.s\.-)(?i:u\.k|u\.s\.s\.r))"
_ACRO2 = r"(?:[A-Za-z](?:\.[A-Za-z])+|(?i:canada|sino|korean|eu|japan|non)-(?i:u\.s)|(?i:u\.s\.-)(?i:u\.k|u\.s\.s\.r))"
_HTHING = rf"[A-Za-z0-9][A-Za-z0-9.,\u00AD]*(?:-(?:[A-Za-z0-9\u00AD]+|{_ACRO2}\.))+"
_REDAUX = rf"{_APOS}(?:[msdMSD]|(?i:re|ve|ll))"
_SWORD = r"[A-Za-z\u00AD]*[A-MO-Za-mo-z]\u00AD*"
_SREDAUX = rf"(?i:n){_APOSETC}(?i:t)"
_APOWORD = (rf"(?:{_APOS}(?i:n){_APOS}?|[lLdDjJ]{_APOS}|(?i:dunkin){_APOS}|(?i:somethin){_APOS}|(?i:ol){_APOS}"
            rf"|{_APOS}(?i:em)|(?i:diff){_APOSETC}(?i:rent)|[A-HJ-XZn]{_APOSETC}\p{{L}}{{2}}\p{{L}}*"
            rf"|{_APOS}[2-9]0(?i:s)|{_APOS}(?i:till?)|\p{{L}}\p{{L}}*[aeiouyAEIOUY]{_APOSETC}[aeiouA-Z]\p{{L}}*"
            rf"|{_APOS}(?i:cause)|(?i:cont'd\.?|nor'easter|c'mon|e'er|s'mores|ev'ry|li'l|nat'l)|O{_APOSETC}o)")
_FULLURL = r"(?i:https?)://[^ \t\n\f\r\"<>|()]+[^ \t\n\f\r\"<>|.!?(){},\-]"
_LIKELYURL = (r"(?:(?:(?i:www)\.(?:[^ \t\n\f\r\"<>|.!?(){},]+\.)+[a-zA-Z]{2,4})"
              r"|(?:(?:[^ \t\n\f\r\"`'<>|.!?(){},-_$]+\.)+(?i:com|net|org|edu)))"  # ,-_ is a range, as there
              r"(?:/[^ \t\n\f\r\"<>|()]+[^ \t\n\f\r\"<>|.!?(){},\-])?")
_EMAIL = (r"(?:&lt;|<)?[a-zA-Z0-9][^ \t\n\f\r\"<>|()\u00A0{}]*@(?:[^ \t\n\f\r\"<>|(){}.\u00A0]+\.)*"
          r"[^ \t\n\f\r\"<>|(){}.\u00A0]+(?:&gt;|>)?")
_TWITTER = rf"(?:@[a-zA-Z_][a-zA-Z_0-9]*|#{_LETTER}+)"

_ABMONTH = r"jan|feb|mar|apr|jun|jul|aug|sep|sept|oct|nov|dec"
_ABDAYS = r"mon|tue|tues|wed|thu|thurs|fri"
# Some states are case-sensitive in their first letter: they are also common words.
_ABSTATE = (r"(?i:ala|ariz)|A(?i:z)|A(?i:rk)|(?i:calif|colo|conn|ct|dak)|D(?i:el)|(?i:fla|ga)|I(?i:ll)|(?i:ind|kans?|ky)"
            r"|L(?i:a)|M(?i:ass)|(?i:md|mich|minn)|M(?i:iss)|(?i:mo|mont|neb|nev|okla)|O(?i:re)|P(?i:a)"
            r"|(?i:penn|tenn)|T(?i:ex)|(?i:va|vt)|W(?i:ash)|(?i:wisc?|wyo)")
_ABCOMP = r"inc|cos?|corp|pp?t[ye]s?|ltd|plc|rt|bancorp|bhd|assn|univ|intl|sys"
_ABNUM = r"tel|est|ext|sq"
_ABPTIT = r"jr|sr|bros|(?:ed|ph)\.d|blvd|rd|esq"
# Usually followed by a lower-case word; before an upper-case one the period also ends the sentence.
_ABBREV1 = rf"(?:(?i:{_ABMONTH}|{_ABDAYS})|{_ABSTATE}|(?i:{_ABCOMP}|{_ABNUM}|{_ABPTIT}|etc|al|seq|bldg))\."
_ABTITLE = (r"(?i:mr|mrs|ms)|M(?i:iss)|(?i:drs?|profs?|sens?|reps?|attys?|lt|col|gen|messrs|govs?|adm|rev|maj|sgt"
            r"|cpl|pvt|capt|ste?|ave|pres|lieut|rt|hon|brig|co?mdr|pfc|spc|supts?|det|mt|ft|adj|adv|asst|assoc|ens"
            r"|insp|mlle|mme|msgr|sfc)")
_ABCOMP2 = r"(?i:invt|elec|natl|m[ft]g|dept|ave)"
_ABBREV4 = rf"(?:{_ABTITLE}|(?i:vs)|v|(?i:alex|wm|jos|cie|a\.k\.a|cf|treas|ph)|{_ACRO}|{_ABCOMP2})"
_ABBREV2 = rf"{_ABBREV4}\."  # usually followed by an upper-case word; never a sentence end
_ACRONYM = rf"{_ACRO}\."
_ABBREV3 = r"(?i:ca|figs?|prop|nos?|art|bldg|pp|op)\."  # abbreviations only before a number
# After an acronym, these words mean that its period also ends the sentence (first letter case-sensitive).
_SENT_STARTERS = ("About|According|Additionally|After|An|A|As|At|But|Did|During|Earlier|He|Her|Here|How|However|If|In|"
                  "It|Last|Many|More|Mr.|Ms.|Now|Once|One|Other|Our|She|Since|So|Some|Such|That|The|Their|Then|There|"
                  "These|They|This|We|When|While|What|Who|Why|Yet|You").split("|")
_SENT_START = "|".join(w[0] + "(?i:" + regex.escape(w[1:]) + ")" if len(w) > 1 else w for w in _SENT_STARTERS)
_PHONE = (r"(?:(?:\([0-9]{2,3}\)[ \u00A0]?|(?:\+\+?)?(?:[0-9]{2,4}[\- \u00A0])?[0-9]{2,4}[\- \u00A0])"
          r"[0-9]{3,4}[\- \u00A0]?[0-9]{3,5}|(?:(?:\+\+?)?[0-9]{2,4}\.)?[0-9]{2,4}\.[0-9]{3,4}\.[0-9]{3,5})")
_LDOTS = r"(?:\.{3,5}|(?:\.[ \u00A0]){2,4}\.|[\u0085\u2026])"
_QUOTES = (rf"(?:{_APOS}|''|[`\u2018\u2019\u201A\u201B\u201C\u201D\u0091\u0092\u0093\u0094\u201E\u201F\u2039\u203A"
           r"\u00AB\u00BB]{1,2})")
_DBLQUOT = r"(?:\"|&quot;)"
_TBSPEC = (rf"(?:-(?i:rrb|lrb|rcb|lcb|rsb|lsb)-|(?i:c\.d\.s|pro-|anti-|s&p-500|s&amp;p-500|s&ls|s&amp;ls)"
           rf"|(?i:cap){_APOS}(?i:n)|(?i:c){_APOS}(?i:est))")
_TBSPEC2 = rf"{_APOS}[0-9][0-9]"
_SMILEY = r"[<>]?[:;=][\-o*']?[()DPdpO\\{@|\[\]]"
_ASIANSMILEY = (r"(?:[\^x=~<>]\.\[\^x=~<>]|[\-\^x=~<>']_[\-\^x=~<>']|\([\-\^x=~<>'][_.]?[\-\^x=~<>']\)"
                r"|\([\^x=~<>']-[\^x=~<>'`]\))")
_MISCSYMBOL = (r"[+%&~^|\\\u00A6\u00A7\u00A8\u00A9\u00AC\u00AE\u00AF\u00B0-\u00B3\u00B4-\u00BA\u00D7\u00F7\u0387"
               r"\u2016\u2017\u2020-\u2025\u2030-\u2038\u203B\u203C\u2043\u203E-\u2042\u2044\u207A-\u207F"
               r"\u208A-\u208E\u2100-\u214F\u2190-\u21FF\u2200-\u2BFF\u3001-\u3006\u3008-\u3020\u30FB"
               r"\uFF01-\uFF0F\uFF1A-\uFF20\uFF3B-\uFF40\uFF5B-\uFF65]")
_CP1252_MISC = r"[\u0086\u0087\u0089\u0095\u0098\u0099]"
_INSENTP = r"[,;:\u3001]"

# ---- what a rule does with its match ----
# An action gets the matched token text (trailing context excluded) and returns the token to emit
# (None: emit nothing) and how many characters of the match it consumed (the rest is scanned again).
Action = Callable[[str], "tuple[str | None, int]"]


def _keep(tok: str) -> tuple[str | None, int]:
    return tok, len(tok)


def _skip(tok: str) -> tuple[str | None, int]:
    return None, len(tok)


def _constant(value: str) -> Action:
    return lambda tok: (value, len(tok))


def _push_back(n: int) -> Action:
    return lambda tok: (tok[:-n], len(tok) - n)


def _no_soft_hyphen(tok: str) -> tuple[str | None, int]:
    return tok.replace("\u00AD", ""), len(tok)


_SINGLE_QUOTE = regex.compile(r"&apos;|'")
_DOUBLE_QUOTE = regex.compile(r"\"|''|'`|`'|&quot;")
_LEFT_SINGLE = regex.compile("[\u0082\u008B\u0091\u2018\u201B\u2039]")  # not U+201A: it stays
_RIGHT_SINGLE = regex.compile("[\u0092\u009B\u00B4\u2019\u203A]")
_LEFT_DOUBLE = regex.compile("[\u0084\u0093\u201C\u00AB]|[\u0091\u2018]'")  # not U+201E: it stays
_RIGHT_DOUBLE = regex.compile("[\u0094\u201D\u00BB]|[\u0092\u2019]'")


def _latex_quotes(tok: str, probably_left: bool) -> str:
    """Straight quotes become ` `` (opening) or ' '' (closing); curly ones by their direction."""
    if probably_left:
        tok = _DOUBLE_QUOTE.sub("``", _SINGLE_QUOTE.sub("`", tok))
    else:
        tok = _DOUBLE_QUOTE.sub("''", _SINGLE_QUOTE.sub("'", tok))
    tok = _LEFT_SINGLE.sub("`", tok)
    tok = _RIGHT_SINGLE.sub("'", tok)
    tok = _LEFT_DOUBLE.sub("``", tok)
    return _RIGHT_DOUBLE.sub("''", tok)


def _quote(probably_left: bool) -> Action:
    return lambda tok: (_latex_quotes(tok, probably_left), len(tok))


def _currency(tok: str) -> tuple[str | None, int]:
    if tok == "\u00A2":
        return "cents", 1
    if tok == "\u00A3":
        return "#", 1
    return "$", 1


def _fraction(tok: str) -> tuple[str | None, int]:
    return tok.replace(" ", "\u00A0"), len(tok)


_FRACTION_CHARS = {"\u00BC": "1/4", "\u00BD": "1/2", "\u00BE": "3/4", "\u2153": "1/3", "\u2154": "2/3"}


def _fraction_char(tok: str) -> tuple[str | None, int]:
    return _FRACTION_CHARS.get(tok, tok), len(tok)


def _number(tok: str) -> tuple[str | None, int]:
    # soft hyphens and thin spaces are thousands separators or line-break hints: dropped
    return regex.sub("[\u00AD\u066C\u2009\u202F]", "", tok), len(tok)


def _acronym(tok: str) -> tuple[str | None, int]:
    # "I." before a sentence start is the letter then a period; longer acronyms keep their period and
    # the period is emitted again as the sentence end
    if len(tok) == 2:
        return tok[:1], 1
    return tok, len(tok) - 1


def _abbrev_sentence_end(tok: str) -> tuple[str | None, int]:
    return tok, len(tok) - 1  # the abbreviation with its period, then the period again


def _hyphens(tok: str) -> tuple[str | None, int]:
    return ("--" if 3 <= len(tok) <= 4 else tok), len(tok)


def _phone(tok: str) -> tuple[str | None, int]:
    return tok.replace(" ", "\u00A0").replace("(", "-LRB-").replace(")", "-RRB-"), len(tok)


def _amp(tok: str) -> tuple[str | None, int]:
    return tok.replace("&amp;", "&"), len(tok)


def _brackets(tok: str) -> tuple[str | None, int]:
    return tok.replace("(", "-LRB-").replace(")", "-RRB-"), len(tok)


def _cp1252(tok: str) -> tuple[str | None, int]:
    return {"\u0086": "\u2020", "\u0087": "\u2021", "\u0089": "\u2030", "\u0095": "\u2022", "\u0098": "~",
            "\u0099": "\u2122"}.get(tok, tok), len(tok)


# (pattern, trailing context or None, action), in priority order: on equal length the earlier wins.
_RULE_TABLE: list[tuple[str, str | None, Action]] = [
    (r"c\+\+|[cCfF]#", None, _keep),
    (r"(?i:cannot|'twas)", None, _push_back(3)),  # can not, 't was
    (rf"{_APOS}(?i:tis)|(?i:gonna|gotta|lemme|gimme|wanna)", None, _push_back(2)),  # gon na ...
    (_SGML, None, lambda tok: (regex.sub(r"[ \r\n]", "\u00A0", tok), len(tok))),
    (r"&(?i:md|mdash|ndash);|[\u0096\u0097\u2013\u2014\u2015]", None, _constant("--")),
    (r"&(?i:amp);", None, _constant("&")),
    (r"&(?i:ht|tl|ur|lr|qc|ql|qr|odq|cdq|#[0-9]+);", None, _keep),
    (_WORD, _REDAUX, _no_soft_hyphen),
    (_SWORD, _SREDAUX, _no_soft_hyphen),
    (_WORD, None, _no_soft_hyphen),
    (_APOWORD, None, _keep),
    (rf"(?i:y){_APOS}", r"\p{L}", _keep),
    (_FULLURL, None, _keep),
    (_LIKELYURL, None, _keep),
    (_EMAIL, None, _keep),
    (_TWITTER, None, _keep),
    (_REDAUX, r"[^A-Za-z]", _quote(False)),
    (_SREDAUX, r"[^A-Za-z]", _quote(False)),
    (_DATE, None, _keep),
    (_NUMBER, None, _number),
    (_SUBSUPNUM, None, _keep),
    (_FRAC, None, _fraction),
    (_FRAC2, None, _fraction_char),
    (_TBSPEC, None, _amp),
    (_THING3, None, _keep),
    (_DOLSIGN, None, _keep),
    (_DOLSIGN2, None, _currency),
    (_ACRONYM, rf"{_SPACENLS}(?:{_SENT_START}|{_SGML})(?:{_SPACENL}|[?!])", _acronym),
    (_ABBREV3, rf"{_SPACENL}?{_DIGIT}", _keep),
    (r"(?i:pt[ey]|co)\.", rf"{_SPACE}(?i:ltd|lim)", _keep),
    (_ABBREV1, _SENTEND, _abbrev_sentence_end),
    (_ABBREV1, r"(?s:..)", _keep),
    (_ABBREV1, None, _abbrev_sentence_end),
    (_ABBREV2, None, _keep),
    (_ABBREV4, _SPACE, _keep),
    (_ACRO, _SPACENL, _keep),
    (_TBSPEC2, _SPACENL, _keep),
    (_FILENAME, rf"{_SPACENL}|[.?!,\"'<]", _keep),
    (rf"{_WORD}\.", _INSENTP, _no_soft_hyphen),
    (_PHONE, None, _phone),
    (_DBLQUOT, r"[A-Za-z0-9$]", _quote(True)),
    (_DBLQUOT, None, _quote(False)),
    (r"\x7F", None, _skip),
    (r"<|&(?i:lt);", None, _constant("<")),
    (r">|&(?i:gt);", None, _constant(">")),
    (_SMILEY, r"[^A-Za-z0-9]", _brackets),
    (_ASIANSMILEY, None, _brackets),
    (r"\{", None, _constant("-LCB-")),
    (r"\}", None, _constant("-RCB-")),
    (r"\[", None, _constant("-LSB-")),
    (r"\]", None, _constant("-RSB-")),
    (r"\(", None, _constant("-LRB-")),
    (r"\)", None, _constant("-RRB-")),
    (r"-+", None, _hyphens),
    (_LDOTS, None, _constant("...")),
    (r"@+|#+|_+", None, _keep),
    (r"\*+|(?:\\\*){1,3}", None, _keep),
    (_INSENTP, None, _keep),
    (r"[?!]+", None, _keep),
    (r"[.\u00A1\u00BF\u037E\u0589\u061F\u06D4\u0700-\u0702\u07FA\u3002]", None, _keep),
    (r"=", None, _keep),
    (r"/", None, _keep),
    (rf"{_HTHING}\.", _INSENTP, _no_soft_hyphen),
    (_HTHING, None, _no_soft_hyphen),
    (rf"{_THING}\.", _INSENTP, _keep),
    (_THING, None, _keep),
    (rf"{_THINGA}\.", _INSENTP, _amp),
    (_THINGA, None, _amp),
    (r"'", r"[A-Za-z][^ \t\n\r\u00A0]", _quote(True)),  # a straight quote before a word opens a quotation
    (_REDAUX, None, _quote(False)),
    (_SREDAUX, None, _quote(False)),
    (_QUOTES, None, _quote(False)),
    (r"<<|>>", None, _keep),
    (_MISCSYMBOL, None, _keep),
    (_CP1252_MISC, None, _cp1252),
    (rf"\x00|{_SPACE}+|[\u200B\u200E\u200F\uFEFF]", None, _skip),
    (_NEWLINE, None, _constant(_NL)),
    (r"&(?i:nbsp);", None, _skip),
    (r"(?s:.)", None, _skip),  # untokenizable: the reference drops it (with a warning)
]


class _Rule:
    __slots__ = ("pattern", "has_context", "action")

    def __init__(self, pattern: str, context: str | None, action: Action):
        # POSIX (leftmost-longest) matching, as a JFlex DFA matches each rule
        body = f"(?P<tok>{pattern})" + (f"(?=(?P<ctx>{context}))" if context else "")
        self.pattern = regex.compile(body, regex.POSIX | regex.V0)
        self.has_context = context is not None
        self.action = action


_RULES = [_Rule(p, c, a) for p, c, a in _RULE_TABLE]
_RULES_BY_FIRST_CHAR: dict[str, list[_Rule]] = {}


def _rules_starting_with(ch: str) -> list[_Rule]:
    """The rules whose match can begin with `ch` (a partial match of `ch` alone says so), cached."""
    rules = _RULES_BY_FIRST_CHAR.get(ch)
    if rules is None:
        rules = [r for r in _RULES if r.pattern.match(ch, partial=True) is not None]
        _RULES_BY_FIRST_CHAR[ch] = rules
    return rules


# Fast path: a run of ASCII letters followed by white space (or by , ; ) and then white space) is a token
# by itself under every rule that can match there, except the words that the lexer splits.
_PLAIN_WORD = regex.compile(r"[A-Za-z]+(?=[ \t\n]|[,;)](?:[ \t\n]|$)|$)")
_SPLIT_WORDS = frozenset(["cannot", "gonna", "gotta", "lemme", "gimme", "wanna"])


def _scan(text: str) -> Iterable[str]:
    """Yield the lexer's tokens for `text` (newlines as `*NL*`), before lower-casing."""
    pos, end = 0, len(text)
    line_end = -1
    while pos < end:
        if pos > line_end:
            # Matching stops at the end of the line after the current one: no token or trailing context
            # reaches further, and without a bound the regex engine may search the whole text for a
            # required character (such as the @ of an e-mail address) at every position.
            line_end = text.find("\n", pos)
            if line_end < 0:
                line_end = window_end = end
            else:
                following = text.find("\n", line_end + 1)
                window_end = end if following < 0 else following + 1
        m = _PLAIN_WORD.match(text, pos, window_end)
        if m is not None and m.group().lower() not in _SPLIT_WORDS:
            yield m.group()
            pos = m.end()
            continue
        best_len, best = -1, None
        for rule in _rules_starting_with(text[pos]):
            m = rule.pattern.match(text, pos, window_end)
            if m is None:
                continue
            total = m.end("ctx") if rule.has_context else m.end()
            if total - pos > best_len:
                best_len, best = total - pos, (rule, m.group("tok"))
        rule, tok = best
        emitted, consumed = rule.action(tok)
        if emitted is not None and emitted != "":
            yield emitted
        pos += max(consumed, 1)


# Line breaks inside one caption: the reference would start a new line there and misalign every later
# caption, so they become spaces. (U+0085 stays: the lexer reads it as an ellipsis, not a line break.)
_LINE_BREAKS = regex.compile("\r\n|[\r\n\u2028\u2029\u000B\u000C]")


def ptb_tokens(text: str) -> list[str]:
    """The PTB tokens of one text as CoreNLP 3.4.1 returns them (case and punctuation kept)."""
    return [t for t in _scan(_LINE_BREAKS.sub(" ", text)) if t != _NL]


def coco_tokenize(captions: Sequence[str]) -> list[str]:
    """Tokenise captions exactly as pycocoevalcap's PTBTokenizer does: one output per caption, its
    lower-cased PTB tokens without the punctuation tokens, joined by single spaces.

    Pass all captions of one side (all references, or all predictions) in one call and in a fixed
    order: like the reference, the lexer reads them as one text, one caption per line.
    """
    text = "\n".join(_LINE_BREAKS.sub(" ", c) for c in captions)
    lines: list[list[str]] = [[]]
    for tok in _scan(text):
        if tok == _NL:
            lines.append([])
        else:
            lines[-1].append(tok.lower())
    assert len(lines) == len(captions) or not captions, (len(lines), len(captions))
    return [" ".join(t for t in line if t not in PUNCTUATION) for line in lines][:len(captions)]

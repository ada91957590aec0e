"""Penn Treebank tokenisation as the COCO caption evaluation applies it, in pure Python.

pycocoevalcap tokenises every caption by running Stanford CoreNLP 3.4.1's `PTBTokenizer` (Java) with
`-preserveLines -lowerCase` over all captions of one side (references, or predictions) joined by
newlines, then drops the punctuation tokens in `PUNCTUATION`. `coco_tokenize` reproduces that output
without Java: a longest-match lexer in the manner of JFlex (at each position every rule is tried; the
longest match, trailing context included, wins; ties go to the earlier rule), with rules written for
the token classes that captions and reports contain (words, numbers, hyphenated and slashed terms,
abbreviations, contractions, quotes, brackets, dashes, ellipses, currency, URLs, e-mail addresses).
It is tested token for token against the jar on the IU X-ray, ROCO, VQA-RAD, SLAKE and PathVQA text.

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

# ---- building blocks (named after the CoreNLP lexer's macros so the rules can be compared) ----
_SPACE = r"[ \t\u00A0\u2000-\u200A\u3000]"
_NEWLINE = r"(?:\r\n|\r|\n|\u2028|\u2029|\u000B|\u000C|\u0085)"
_SPACENL = rf"(?:{_SPACE}|{_NEWLINE})"
_SPACENLS = rf"(?:{_SPACENL})+"
_SPACENL_ONE = r"[ \t\u00A0\u2000-\u200A\u3000\r\n\u2028\u2029\u000B\u000C\u0085]"
_NOT_SPACENL_ONE = r"[^ \t\u00A0\u2000-\u200A\u3000\r\n\u2028\u2029\u000B\u000C\u0085]"
_SGML = (r"<(?:[!?][A-Za-z\-][^>\r\n]*|[A-Za-z][A-Za-z0-9_:.\-]*(?:[ ]+(?:[A-Za-z][A-Za-z0-9_:.\-]*"
         r"|[A-Za-z][A-Za-z0-9_:.\-]*[ ]*=[ ]*(?:'[^']*'|\"[^\"]*\"|[A-Za-z][A-Za-z0-9_:.\-]*)))*[ ]*/?"
         r"|/[A-Za-z][A-Za-z0-9_:.\-]*)[ ]*>")
_SENTEND = rf"{_SPACENL}(?:{_SPACENL}|\p{{Lu}}|{_SGML})"
_DIGIT = r"[\p{Nd}]"
_ALNUM = r"[\p{Alphabetic}\p{Nd}]"
_SPLET = r"&[aeiouAEIOU](?:acute|grave|uml);"
_LETTER = rf"(?:\p{{L}}|{_SPLET}|[\u00AD\u0237-\u024F\u02C2-\u02C5\u02D2-\u02DF\u02E5-\u02FF\u0300-\u036F])"
_WORD = rf"{_LETTER}(?:{_LETTER}|{_DIGIT})*(?:[.!?]{_LETTER}(?:{_LETTER}|{_DIGIT})*)*"
_DATE = rf"{_DIGIT}{{1,2}}[\-/]{_DIGIT}{{1,2}}[\-/]{_DIGIT}{{2,4}}"
_NUM = (rf"(?:{_DIGIT}*(?:[.,\u066B\u066C]{_DIGIT}+)+"
        rf"|{_DIGIT}+(?:[.:,\u00AD\u066B\u066C\u2009\u202F]{_DIGIT}+)*)")
_NUMBER = rf"[\-+]?{_NUM}"
_SUBSUPNUM = r"[\u207A\u207B\u208A\u208B]?(?:[\u2070\u00B9\u00B2\u00B3\u2074-\u2079]+|[\u2080-\u2089]+)"
_FRAC = rf"(?:{_DIGIT}{{1,4}}[\- \u00A0])?{_DIGIT}{{1,4}}(?:\\?/|\u2044){_DIGIT}{{1,4}}"
_FRAC2 = r"[\u00BC\u00BD\u00BE\u2153-\u215E]"
_DOLSIGN = r"(?:[A-Z]*\$|#)"
_DOLSIGN2 = r"[\u00A2\u00A3\u00A4\u00A5\u0080\u20A0\u20AA\u20AC\u20B9\u060B\u0E3F\u20A4\uFFE0\uFFE1\uFFE5\uFFE6]"
_APOS = r"(?:['\u0092\u2019\u00B4]|&apos;)"
_APOSETC = rf"(?:{_APOS}|[`\u0091\u2018\u201B])"
_HYPHEN = r"[\-_\u058A\u2010\u2011]"
_THING = (rf"(?:[dDoOlL]{_APOSETC}{_ALNUM})?(?:{_ALNUM}+|{_NUMBER})"
          rf"(?:{_HYPHEN}(?:[dDoOlL]{_APOSETC}{_ALNUM})?(?:{_ALNUM}+|{_NUM}))*")
_THINGA = r"[A-Z]+(?:(?:[+&]|&amp;)[A-Z]+)+"
_THING3 = r"[\p{Alphabetic}\p{Nd}]+(?:-\p{Alphabetic}+){0,2}(?:\\?/[\p{Alphabetic}\p{Nd}]+(?:-\p{Alphabetic}+){0,2}){1,2}"
_ACRO = r"(?:[A-Za-z](?:\.[A-Za-z])*|(?i:canada|sino|korean|eu|japan|non)-(?i:u\.s)|(?i:u\.s\.-)(?i:u\.k|u\.s\.s\.r))"
_ACRO2 = r"(?:[A-Za-z](?:\.[A-Za-z])+|(?i:canada|sino|korean|eu|japan|non)-(?i:u\.s)|(?i:u\.s\.-)(?i:u\.k|u\.s\.s\.r))"
_HTHING = (rf"{_ALNUM}[\p{{Alphabetic}}\p{{Nd}}.,\u00AD]*"
           rf"(?:-(?:[\p{{Alphabetic}}\p{{Nd}}\u00AD]+(?:\.{_DIGIT}+)?|{_ACRO2}\.))+")
_REDAUX = rf"{_APOS}(?:[msdMSD]|(?i:re|ve|ll))"
_SWORD = r"[\p{Alphabetic}\u00AD]*[A-MO-Za-mo-z]\u00AD*"
_SREDAUX = rf"(?i:n){_APOSETC}(?i:t)"
_APOWORD = (rf"(?:{_APOS}(?i:n){_APOS}?|[lLdDjJ]{_APOS}|(?i:dunkin){_APOS}|(?i:somethin){_APOS}|(?i:ol){_APOS}"
            rf"|{_APOS}(?i:em)|(?i:diff){_APOSETC}(?i:rent)|[A-HJ-XZn]{_APOSETC}\p{{L}}{{2}}\p{{L}}*"
            rf"|{_APOS}[2-9]0(?i:s)|{_APOS}(?i:till?)|\p{{L}}\p{{L}}*[aeiouyAEIOUY]{_APOSETC}[aeiouA-Z]\p{{L}}*"
            rf"|{_APOS}(?i:cause)|(?i:cont'd\.?|nor'easter|c'mon|e'er|s'mores|ev'ry|li'l|nat'l)|O{_APOSETC}o)")
_FULLURL = (r"(?i:ftp|svn|svn\+ssh|http|https|mailto)://[^ \t\n\f\r\"<>|(){}\[\]]+"
            r"[^ \t\n\f\r\"'<>|.!?(){},;:&\[\]\-]")
_LIKELYURL = (r"(?:(?:(?i:www)\.(?:[^ \t\n\f\r\"<>|.!?(){},]+\.)+[a-zA-Z]{2,4})"
              r"|(?:(?:[^ \t\n\f\r\"`'<>|.!?(){},\-_$]+\.)+(?i:com|net|org|edu)))"
              r"(?:/[^ \t\n\f\r\"<>|()]+[^ \t\n\f\r\"<>|.!?(){},\-])?")
_EMAIL = r"(?:&lt;|<)?(?i:mailto:)?[a-zA-Z0-9._%+\-]+@[A-Za-z0-9][A-Za-z0-9.\-]*[A-Za-z0-9](?:&gt;|>)?"
_TWITTER = r"(?:@[a-zA-Z_][a-zA-Z_0-9]*|#{_LETTER}(?:{_LETTER}|{_DIGIT}|_)*(?:{_LETTER}|{_DIGIT}))"
_TWITTER = _TWITTER.replace("{_LETTER}", _LETTER).replace("{_DIGIT}", _DIGIT)

_ABMONTH = r"jan|feb|mar|apr|jun|jul|aug|sep|sept|oct|nov|dec"
_ABDAYS = r"mon|tue|tues|wed|thu|thurs|fri"
# The states are case sensitive in their first letter (they are also common words).
_ABSTATE = (r"(?i:ala|ariz)|A(?i:z)|A(?i:rk)|(?i:calif|colo|conn|ct|dak)|D(?i:el)|(?i:fla|ga)|I(?i:ll)|(?i:ind|kans?|ky)"
            r"|L(?i:a)|M(?i:ass)|(?i:md|mich|minn)|M(?i:iss)|(?i:mo|mont|neb|nev|okla)|O(?i:re)|P(?i:a)"
            r"|(?i:penn|tenn)|T(?i:ex)|(?i:va|vt)|W(?i:ash)|(?i:wisc?|wyo)")
_ABCOMP = r"inc|cos?|corp|pp?t[ye]s?|ltd|plc|rt|bancorp|bhd|assn|univ|intl|sys"
_ABNUM = r"tel|est|ext|sq"
_ABPTIT = r"jr|bros|(?:ed|ph)\.d|esq"
_ABBREV1 = (rf"(?:(?i:{_ABMONTH}|{_ABDAYS})|{_ABSTATE}|(?i:{_ABCOMP}|{_ABNUM}|{_ABPTIT}|etc|al|seq|bldg))\.")
_ABTITLE = (r"(?i:mr|mrs|ms|mx)|M(?i:iss)|(?i:drs?|profs?|sens?|reps?|attys?|lt|col|gen|messrs|govs?|adm|rev|maj|sgt"
            r"|cpl|pvt|capt|ste?|ave|pres|lieut|rt|hon|brig|co?mdr|pfc|spc|supts?|det|mt|ft|adj|adv|asst|assoc|ens"
            r"|insp|mlle|mme|msgr|sfc|sr)")
_ABCOMP2 = r"(?i:invt|elec|natl|m[ft]g|dept|blvd|rd|ave)"
_ABBREV4 = rf"(?:{_ABTITLE}|(?i:vs)|v|(?i:alex|wm|jos|cie|a\.k\.a|cf|treas|ph)|{_ACRO}|{_ABCOMP2})"
_ABBREV2 = rf"{_ABBREV4}\."
_ACRONYM = rf"{_ACRO}\."
_ABBREV3 = r"(?:(?i:ca|figs?|prop|nos?|sect?s?|arts?|paras?|bldg|pp|op|approx|rs)|Pt)\."
# Words after which an acronym's period is taken as a sentence end too (first letter case-sensitive).
_SENT_STARTERS = ("About|According|Additionally|After|An|A|As|At|But|Did|During|Earlier|He|Her|Here|How|However|If|In|"
                  "It|Last|Many|More|Mr.|Ms.|Now|Once|One|Other|Our|She|Since|So|Some|Such|That|The|Their|Then|There|"
                  "These|They|This|We|When|While|What|Who|Why|Yet|You").split("|")
_SENT_START = "|".join(w[0] + "(?i:" + regex.escape(w[1:]) + ")" if len(w) > 1 else w for w in _SENT_STARTERS)
_PHONE = (r"(?:(?:\([0-9]{2,3}\)[ \u00A0]?|(?:\+\+?)?(?:[0-9]{2,4}[\- \u00A0])?[0-9]{2,4}[\- \u00A0])"
          r"[0-9]{3,4}[\- \u00A0]?[0-9]{3,5}|(?:(?:\+\+?)?[0-9]{2,4}\.)?[0-9]{2,4}\.[0-9]{3,4}\.[0-9]{3,5})")
_LDOTS = r"(?:\.\.\.+|[\u0085\u2026])"
_SPACEDLDOTS = r"\.[ \u00A0](?:\.[ \u00A0])+\."
_QUOTES = r"(?:" + _APOS + r"|[`\u2018-\u201F\u0082\u0084\u0091-\u0094\u2039\u203A\u00AB\u00BB]{1,2})"
_DBLQUOT = r"(?:\"|&quot;|[`'\u0091\u0092\u2018\u2019]')"
_TBSPEC = r"(?:-(?i:rrb|lrb|rcb|lcb|rsb|lsb)-|(?i:c\.d\.s|pro-|anti-|s&p-500|s&amp;p-500|s&ls|s&amp;ls)" \
          r"|(?i:cap)" + _APOS + r"(?i:n)|(?i:c)" + _APOS + r"(?i:est))"
_TBSPEC2 = _APOS + r"[0-9][0-9]"
_MISCSYMBOL = (r"[+%&~^|\\\u00A6\u00A7\u00A8\u00A9\u00AC\u00AE\u00AF\u00B0-\u00B3\u00B4-\u00BA\u00D7\u00F7\u0387"
               r"\u2016\u2017\u2020-\u2025\u2030-\u2038\u203B\u203C\u2043\u203E-\u2042\u2044\u207A-\u207F"
               r"\u208A-\u208E\u2100-\u214F\u2190-\u21FF\u2200-\u2BFF\u3001-\u3006\u3008-\u3020\u30FB"
               r"\uFF01-\uFF0F\uFF1A-\uFF20\uFF3B-\uFF40\uFF5B-\uFF65]")
_CP1252_MISC = r"[\u0086\u0087\u0089\u0095\u0098\u0099]"

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
_LEFT_SINGLE = regex.compile("[\u0082\u008B\u0091\u2018\u201A\u201B\u2039]")
_RIGHT_SINGLE = regex.compile("[\u0092\u009B\u00B4\u2019\u203A]")
_LEFT_DOUBLE = regex.compile("[\u0084\u0093\u201C\u201E\u00AB]|[\u0091\u2018]'")
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


def _smiley(tok: str) -> tuple[str | None, int]:
    return tok.replace("(", "-LRB-").replace(")", "-RRB-"), len(tok)


def _cp1252(tok: str) -> tuple[str | None, int]:
    return {"\u0086": "\u2020", "\u0087": "\u2021", "\u0089": "\u2030", "\u0095": "\u2022", "\u0098": "~",
            "\u0099": "\u2122"}.get(tok, tok), len(tok)


# (pattern, trailing context or None, action), in priority order: on equal length the earlier wins.
_RULE_TABLE: list[tuple[str, str | None, Action]] = [
    (r"(?i:cannot|'twas|dunno)", None, _push_back(3)),
    (rf"{_APOS}(?i:tis)|(?i:gonna|gotta|lemme|gimme|wanna|nno)", None, _push_back(2)),
    (_SGML, None, lambda tok: (regex.sub(r"[ \r\n]", "\u00A0", tok), len(tok))),
    (r"&(?i:md|mdash|ndash);|[\u0096\u0097\u2013\u2014\u2015]", None, _constant("--")),
    (r"&(?i:amp);", None, _constant("&")),
    (r"&(?i:ht|tl|ur|lr|qc|ql|qr|odq|cdq|#[0-9]+);", None, _keep),
    (_WORD, _REDAUX, _no_soft_hyphen),
    (_SWORD, _SREDAUX, _no_soft_hyphen),
    (_WORD, None, _no_soft_hyphen),
    (_APOWORD, None, _quote(False)),
    (rf"(?i:y){_APOS}", r"\p{L}", _keep),
    (_FULLURL, None, _keep),
    (_LIKELYURL, None, _keep),
    (_EMAIL, None, _keep),
    (_TWITTER, None, _keep),
    (_REDAUX, r"[^\p{Alphabetic}]", _quote(False)),
    (_SREDAUX, r"[^\p{Alphabetic}]", _quote(False)),
    (_DATE, None, _keep),
    (_NUMBER, None, _number),
    (_SUBSUPNUM, None, _keep),
    (_FRAC, None, _fraction),
    (_FRAC2, None, _fraction_char),
    (_TBSPEC, None, _amp),
    (r"(?i:e|yahoo|jeopardy)!", None, _keep),
    (_THING3, None, _keep),
    (_DOLSIGN, None, _keep),
    (_DOLSIGN2, None, _currency),
    (_ACRONYM, rf"{_SPACENLS}(?:{_SENT_START}|{_SGML})(?:{_SPACENL}|[?!])", _acronym),
    (_ABBREV3, rf"{_SPACENL}?{_DIGIT}", _keep),
    (r"(?i:so|no)\.", rf"{_SPACENL}+(?i:africa|korea|cal)", _keep),
    (r"(?i:pt[ey]|co)\.", rf"{_SPACE}(?i:ltd|lim)", _keep),
    (_ABBREV1, _SENTEND, _abbrev_sentence_end),
    (_ABBREV1, r"(?s:..)", _keep),
    (_ABBREV1, None, _abbrev_sentence_end),
    (_ABBREV2, None, _keep),
    (_ABBREV4, _SPACE, _keep),
    (_ACRO, _SPACENL, _keep),
    (_TBSPEC2, _SPACENL, _keep),
    (rf"{_WORD}\.", r"[,;:\u3001]", _no_soft_hyphen),
    (_PHONE, None, _phone),
    (_DBLQUOT, r"[\p{Alphabetic}\p{Nd}$]", _quote(True)),
    (_DBLQUOT, None, _quote(False)),
    (r"\x7F", None, _skip),
    (r"<|&(?i:lt);", None, _constant("<")),
    (r">|&(?i:gt);", None, _constant(">")),
    (r"[<>]?[:;=][\-o*']?[()DPdpO\\{@|\[\]]", r"[^\p{Alphabetic}\p{Nd}]", _smiley),
    (r"\{", None, _constant("-LCB-")),
    (r"\}", None, _constant("-RCB-")),
    (r"\[", None, _constant("-LSB-")),
    (r"\]", None, _constant("-RSB-")),
    (r"\(", None, _constant("-LRB-")),
    (r"\)", None, _constant("-RRB-")),
    (r"-+", None, _hyphens),
    (_LDOTS, rf"\.{_SPACENLS}\p{{L}}", _constant("...")),
    (_SPACEDLDOTS, rf"{_SPACE}\.{_SPACENLS}\p{{L}}", _constant("...")),
    (rf"{_LDOTS}|{_SPACEDLDOTS}", None, _constant("...")),
    (r"@+|#+|_+", None, _keep),
    (r"\*+|(?:\\\*){1,3}", None, _keep),
    (r"[,;:\u3001]", None, _keep),
    (r"[?!]+", None, _keep),
    (r"[.\u00A1\u00BF\u037E\u0589\u061F\u06D4\u0700-\u0702\u07FA\u3002]", None, _keep),
    (r"=+", None, _keep),
    (r"/", None, _keep),
    (_HTHING, None, _no_soft_hyphen),
    (rf"{_HTHING}\.", r"[,;:\u3001]", _no_soft_hyphen),
    (_THING, None, _quote(False)),
    (rf"{_THINGA}\.", r"[,;:\u3001]", _amp),
    (_THINGA, None, _amp),
    (_QUOTES, rf"\p{{L}}{_NOT_SPACENL_ONE}", _quote(True)),
    (_QUOTES, rf"[AaIiUu]{_SPACENL_ONE}", _quote(True)),
    (_QUOTES, None, _quote(False)),
    (_REDAUX, None, _quote(False)),
    (_SREDAUX, None, _quote(False)),
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


def _scan(text: str) -> Iterable[str]:
    """Yield the lexer's tokens for `text` (newlines as `*NL*`), before lower-casing."""
    pos, end = 0, len(text)
    while pos < end:
        best_len, best = -1, None
        for rule in _RULES:
            m = rule.pattern.match(text, pos)
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


def ptb_tokens(text: str) -> list[str]:
    """The PTB tokens of one text, as CoreNLP 3.4.1 returns them (case kept, punctuation kept)."""
    return [t for t in _scan(text.replace("\n", " ")) if t != _NL]


def coco_tokenize(captions: Sequence[str]) -> list[str]:
    """Tokenise captions exactly as pycocoevalcap's PTBTokenizer does: one output per caption, its
    lower-cased PTB tokens without the punctuation tokens, joined by single spaces.

    Pass all captions of one side (all references, or all predictions) in one call and in a fixed
    order: like the reference, the lexer reads them as one text, one caption per line.
    """
    text = "\n".join(c.replace("\n", " ") for c in captions)
    lines: list[list[str]] = [[]]
    for tok in _scan(text):
        if tok == _NL:
            lines.append([])
        else:
            lines[-1].append(tok.lower())
    if len(lines) != len(captions):  # a caption made only of newline-like characters
        raise ValueError(f"tokeniser produced {len(lines)} lines for {len(captions)} captions")
    return [" ".join(t for t in line if t not in PUNCTUATION) for line in lines]

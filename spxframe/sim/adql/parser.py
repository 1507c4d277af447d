"""ADQL subset for the simulated TAP service: tokenizer and recursive-descent parser.

The parser produces a small tuple AST (see ``Query``); ``evaluate`` evaluates it over numpy
columns. Errors raise ``AdqlError`` with a message in the style of a TAP service.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field


class AdqlError(Exception):
    """A query that cannot be parsed or evaluated (answered as TAP QUERY_STATUS=ERROR)."""


KEYWORDS = {
    "SELECT", "DISTINCT", "ALL", "TOP", "FROM", "WHERE", "AND", "OR", "NOT", "AS", "JOIN",
    "INNER", "LEFT", "OUTER", "ON", "ORDER", "BY", "ASC", "DESC", "IN", "BETWEEN", "IS",
    "NULL", "LIKE", "ILIKE", "OFFSET", "GROUP", "HAVING", "TRUE", "FALSE", "CROSS", "NATURAL",
    "RIGHT", "FULL", "USING", "LIMIT",
}

_TOKEN_RE = re.compile(r"""
    (?P<ws>\s+|--[^\n]*)
  | (?P<num>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<str>'(?:[^']|'')*')
  | (?P<qid>"(?:[^"]|"")+")
  | (?P<id>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<op>\|\||<>|!=|<=|>=|[-+*/%=<>(),.])
""", re.VERBOSE)


@dataclass
class Tok:
    kind: str  # 'num', 'str', 'id', 'kw', 'op', 'eof'
    value: object
    pos: int


def tokenize(text: str) -> list[Tok]:
    out: list[Tok] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN_RE.match(text, pos)
        if not m:
            raise AdqlError(f"syntax error at or near \"{text[pos:pos + 10]}\" (position {pos + 1})")
        kind = m.lastgroup
        s = m.group(kind)
        if kind == "num":
            v = float(s) if any(c in s for c in ".eE") else int(s)
            out.append(Tok("num", v, pos))
        elif kind == "str":
            out.append(Tok("str", s[1:-1].replace("''", "'"), pos))
        elif kind == "qid":
            out.append(Tok("id", s[1:-1].replace('""', '"'), pos))
        elif kind == "id":
            u = s.upper()
            out.append(Tok("kw", u, pos) if u in KEYWORDS else Tok("id", s, pos))
        elif kind == "op":
            out.append(Tok("op", "<>" if s == "!=" else s, pos))
        pos = m.end()
    out.append(Tok("eof", None, pos))
    return out


@dataclass
class TableRef:
    name: str  # lower-case qualified name, e.g. 'spherex.plane' or 'tap_upload.cat'
    alias: str  # lower-case


@dataclass
class Join:
    table: TableRef
    on: tuple | None  # None: cross join


@dataclass
class Query:
    select: list = field(default_factory=list)  # [(expr, alias or None)] ; expr ('star', qual|None)
    distinct: bool = False
    top: int | None = None
    table: TableRef | None = None
    joins: list = field(default_factory=list)
    where: tuple | None = None
    order: list = field(default_factory=list)  # [(expr, desc)]
    offset: int | None = None


class Parser:
    def __init__(self, text: str):
        self.text = text
        self.toks = tokenize(text)
        self.toks += [self.toks[-1]] * 3  # look-ahead never runs off the end
        self.i = 0

    # -- helpers --------------------------------------------------------------------------
    @property
    def tok(self) -> Tok:
        return self.toks[self.i]

    def error(self, what: str | None = None):
        t = self.tok
        word = self.text[t.pos:t.pos + 12].split()[0] if self.text[t.pos:].strip() else ""
        near = "end of input" if t.kind == "eof" else f'"{word}"'
        raise AdqlError(f"syntax error at or near {near} (position {t.pos + 1})" + (f": {what}" if what else ""))

    def kw(self, *words) -> bool:
        t = self.tok
        if t.kind == "kw" and t.value in words:
            self.i += 1
            return True
        return False

    def op(self, *ops) -> bool:
        t = self.tok
        if t.kind == "op" and t.value in ops:
            self.i += 1
            return True
        return False

    def expect_kw(self, w):
        if not self.kw(w):
            self.error(f"expected {w}")

    def expect_op(self, o):
        if not self.op(o):
            self.error(f"expected '{o}'")

    def ident(self) -> str:
        t = self.tok
        if t.kind != "id":
            self.error("expected an identifier")
        self.i += 1
        return t.value

    # -- query ----------------------------------------------------------------------------
    def parse(self) -> Query:
        q = self.query()
        self.op(";")
        if self.tok.kind != "eof":
            self.error()
        return q

    def query(self) -> Query:
        q = Query()
        self.expect_kw("SELECT")
        if self.kw("DISTINCT"):
            q.distinct = True
        else:
            self.kw("ALL")
        if self.kw("TOP"):
            if self.tok.kind != "num":
                self.error("TOP needs a number")
            q.top = int(self.tok.value)
            self.i += 1
        q.select = [self.select_item()]
        while self.op(","):
            q.select.append(self.select_item())
        self.expect_kw("FROM")
        q.table = self.table_ref()
        while True:
            if self.op(","):
                q.joins.append(Join(self.table_ref(), None))
                continue
            if self.kw("CROSS"):
                self.expect_kw("JOIN")
                q.joins.append(Join(self.table_ref(), None))
                continue
            if self.tok.kind == "kw" and self.tok.value in ("LEFT", "RIGHT", "FULL", "NATURAL"):
                raise AdqlError(f"{self.tok.value} JOIN is not supported by this service")
            inner = self.kw("INNER")
            if self.kw("JOIN"):
                t = self.table_ref()
                self.expect_kw("ON")
                q.joins.append(Join(t, self.expr()))
                continue
            if inner:
                self.error("expected JOIN")
            break
        if self.kw("WHERE"):
            q.where = self.expr()
        if self.kw("GROUP"):
            raise AdqlError("GROUP BY is not supported by this service")
        if self.kw("ORDER"):
            self.expect_kw("BY")
            while True:
                e = self.expr()
                desc = False
                if self.kw("DESC"):
                    desc = True
                else:
                    self.kw("ASC")
                q.order.append((e, desc))
                if not self.op(","):
                    break
        for _ in range(2):  # OFFSET n / LIMIT n (PostgreSQL-style, accepted by IRSA's backend)
            if self.kw("OFFSET"):
                q.offset = self._int("OFFSET")
            elif self.kw("LIMIT"):
                n = self._int("LIMIT")
                q.top = n if q.top is None else min(q.top, n)
        return q

    def _int(self, what) -> int:
        t = self.tok
        if t.kind != "num" or not isinstance(t.value, int):
            self.error(f"{what} needs an integer")
        self.i += 1
        return t.value

    def select_item(self):
        if self.op("*"):
            return (("star", None), None)
        t0, t1, t2 = self.toks[self.i], self.toks[self.i + 1], self.toks[self.i + 2]
        if t0.kind == "id" and t1.kind == "op" and t1.value == "." and t2.kind == "op" and t2.value == "*":
            self.i += 3
            return (("star", t0.value.lower()), None)
        e = self.expr()
        alias = None
        if self.kw("AS"):
            alias = self.ident() if self.tok.kind == "id" else self._kw_as_ident()
        elif self.tok.kind == "id":
            alias = self.ident()
        return (e, alias)

    def _kw_as_ident(self):
        t = self.tok
        if t.kind in ("kw", "str"):
            self.i += 1
            return str(t.value).lower()
        self.error("expected an alias")

    def table_ref(self) -> TableRef:
        if self.tok.kind == "op" and self.tok.value == "(":
            raise AdqlError("subqueries are not supported by this service")
        parts = [self.ident()]
        while self.op("."):
            parts.append(self.ident())
        name = ".".join(parts).lower()
        alias = parts[-1].lower()
        if self.kw("AS"):
            alias = self.ident().lower()
        elif self.tok.kind == "id":
            alias = self.ident().lower()
        return TableRef(name, alias)

    # -- expressions ----------------------------------------------------------------------
    def expr(self):
        left = self.and_expr()
        while self.kw("OR"):
            left = ("or", left, self.and_expr())
        return left

    def and_expr(self):
        left = self.not_expr()
        while self.kw("AND"):
            left = ("and", left, self.not_expr())
        return left

    def not_expr(self):
        if self.kw("NOT"):
            return ("not", self.not_expr())
        return self.predicate()

    def predicate(self):
        left = self.additive()
        t = self.tok
        if t.kind == "op" and t.value in ("=", "<>", "<", ">", "<=", ">="):
            self.i += 1
            return ("cmp", t.value, left, self.additive())
        neg = self.kw("NOT")
        if self.kw("BETWEEN"):
            lo = self.additive()
            self.expect_kw("AND")
            return ("between", left, lo, self.additive(), neg)
        if self.kw("IN"):
            self.expect_op("(")
            if self.tok.kind == "kw" and self.tok.value == "SELECT":
                raise AdqlError("IN (SELECT ...) subqueries are not supported by this service")
            items = [self.additive()]
            while self.op(","):
                items.append(self.additive())
            self.expect_op(")")
            return ("in", left, items, neg)
        if self.tok.kind == "kw" and self.tok.value in ("LIKE", "ILIKE"):
            ci = self.tok.value == "ILIKE"
            self.i += 1
            return ("like", left, self.additive(), neg, ci)
        if neg:
            self.error("expected BETWEEN, IN or LIKE after NOT")
        if self.kw("IS"):
            n = self.kw("NOT")
            self.expect_kw("NULL")
            return ("isnull", left, n)
        return left

    def additive(self):
        left = self.term()
        while True:
            t = self.tok
            if t.kind == "op" and t.value in ("+", "-", "||"):
                self.i += 1
                left = ("bin", t.value, left, self.term())
            else:
                return left

    def term(self):
        left = self.unary()
        while True:
            t = self.tok
            if t.kind == "op" and t.value in ("*", "/", "%"):
                self.i += 1
                left = ("bin", t.value, left, self.unary())
            else:
                return left

    def unary(self):
        if self.op("-"):
            return ("neg", self.unary())
        if self.op("+"):
            return self.unary()
        return self.primary()

    def primary(self):
        t = self.tok
        if t.kind == "num":
            self.i += 1
            return ("lit", t.value)
        if t.kind == "str":
            self.i += 1
            return ("lit", t.value)
        if t.kind == "kw" and t.value == "NULL":
            self.i += 1
            return ("lit", None)
        if t.kind == "kw" and t.value in ("TRUE", "FALSE"):
            self.i += 1
            return ("lit", 1 if t.value == "TRUE" else 0)
        if self.op("("):
            e = self.expr()
            self.expect_op(")")
            return e
        if t.kind == "id" or (t.kind == "kw" and t.value in ("LEFT", "RIGHT")):
            self.i += 1
            name = t.value
            if name.upper() == "CAST" and self.op("("):
                e = self.expr()
                self.expect_kw("AS")
                typ = self.ident().upper()
                while self.tok.kind == "id":  # DOUBLE PRECISION, CHARACTER VARYING
                    typ += " " + self.ident().upper()
                if self.op("("):
                    self._int("type length")
                    self.expect_op(")")
                self.expect_op(")")
                return ("func", "CAST_" + typ.split()[0], [e])
            if self.op("("):
                fname = name.upper()
                args = []
                if self.op("*"):
                    args.append(("star", None))
                    self.expect_op(")")
                    return ("func", fname, args)
                distinct = self.kw("DISTINCT")
                if not self.op(")"):
                    args.append(self.expr())
                    while self.op(","):
                        args.append(self.expr())
                    self.expect_op(")")
                if distinct:
                    fname += "_DISTINCT"
                return ("func", fname, args)
            parts = [name]
            while self.tok.kind == "op" and self.tok.value == ".":
                self.i += 1
                parts.append(self.ident())
            if len(parts) == 1:
                return ("col", None, parts[0].lower())
            return ("col", ".".join(parts[:-1]).lower(), parts[-1].lower())
        self.error()


def parse(text: str) -> Query:
    """Parse an ADQL query (the subset documented in ``evaluate``)."""
    if not text or not text.strip():
        raise AdqlError("empty query")
    return Parser(text).parse()
